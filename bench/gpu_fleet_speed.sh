#!/usr/bin/env bash
# The engine benchmark's 8B run as a fleet job: `lorafleet up`, then `lorafleet submit --wait`
# of bench/gpu_8b_job.yaml on the same random Llama-3-8B-shaped model and long rows that
# `bench.engine_bench --size 8b --seq 2048` trains; prints the job's last train event, whose
# tokens/s is the number its job page shows.
#
#   OUT=/some/folder bench/gpu_fleet_speed.sh
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export SHAPE=llama-3-8b MODEL=8b LORA=fleet-8b SPEC=bench/gpu_8b_job.yaml
# 64 rows of 2,048 tokens: 32 steps of 2 x 2048.
export DATA='python3 -c "import os; from pathlib import Path; from bench.engine_bench import prepare; prepare(Path(os.environ[\"LORAFLEET_HOME\"]), \"8b\", 2048, 64)"'
exec bash bench/gpu_spine.sh
