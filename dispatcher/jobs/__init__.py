"""The job model: what a job is (specs, states, records, events) and where it is kept (Redis)."""
