"""The Datasets page in a real headless Chromium against a real dashboard process: upload a good
and a bad dataset, preview samples (of a dataset, and of a raw text with its chunking settings),
and preview from the New job form."""

from __future__ import annotations

import json

import pytest

from tests.fleetproc import tiny_fleet
from tests.tiny import CORPUS, tiny_rows

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    f = tiny_fleet(redis_server, tmp_path_factory.mktemp("datasetshome"), "bd", rows=6)
    f.start_dashboard()
    yield f
    f.stop()


def tid(name: str) -> str:
    return f"[data-testid='{name}']"


def test_upload_a_good_and_a_bad_dataset(fleet, page, tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(tiny_rows(5)))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(tiny_rows(2) + [{"instruction": "a", "output": ["x", "y"]}]))

    page.goto(fleet.url + "/datasets")
    assert page.locator(tid("nav-datasets")).get_attribute("class") == "active"
    table = page.locator(tid("datasets-table"))
    assert table.locator("[data-testid='dataset-row'][data-name='tiny.json']").is_visible()

    page.locator(tid("upload-file")).set_input_files(str(good))
    page.locator(tid("upload-submit")).click()
    row = table.locator("[data-testid='dataset-row'][data-name='good.json']")
    row.wait_for(timeout=10000)
    assert row.locator("td").nth(1).inner_text() == "5"
    # Its owner is the uploader (the single user, "local"); a file put there by hand is no one's.
    assert row.locator(tid("owner")).inner_text() == "local"
    hand = table.locator("[data-testid='dataset-row'][data-name='tiny.json']")
    assert hand.locator(tid("owner")).inner_text() == "—"
    assert "saved datasets/good.json (5 rows)" in page.locator(tid("upload-status")).inner_text()
    assert (fleet.settings.paths.datasets / "good.json").read_text() == good.read_text()
    # It is offered in the preview's dataset list without a reload.
    assert page.locator(tid("preview-dataset")).locator("option[value='good.json']").count() == 1

    page.locator(tid("upload-file")).set_input_files(str(bad))
    page.locator(tid("upload-submit")).click()
    error = page.locator(tid("upload-error"))
    error.wait_for(state="visible", timeout=10000)
    assert "bad.json row 3: key 'output' is a list, expected text" in error.inner_text()
    assert table.locator("[data-testid='dataset-row'][data-name='bad.json']").count() == 0
    assert sorted(p.name for p in fleet.settings.paths.datasets.iterdir()) == \
        ["good.json", "tiny.json"]

    # The same name again, without "overwrite": refused, and the file is untouched.
    page.locator(tid("upload-file")).set_input_files(str(good))
    page.locator(tid("upload-submit")).click()
    page.wait_for_function(
        "() => document.querySelector(\"[data-testid='upload-error']\").textContent"
        ".includes('already exists')", timeout=10000)


def test_preview_shows_samples_with_the_trained_part_highlighted(fleet, page):
    page.goto(fleet.url + "/datasets")
    form = page.locator(tid("preview-form"))
    form.locator("[name='model']").select_option("tiny")
    form.locator("[name='dataset']").select_option("tiny.json")
    form.locator("[name='format']").select_option("alpaca-format")
    form.locator("[name='train_only_after']").fill("### Response:")
    page.locator(tid("preview-run")).click()
    results = page.locator(tid("preview-results"))
    results.locator(tid("preview-sample")).first.wait_for(timeout=60000)
    samples = results.locator(tid("preview-sample"))
    assert samples.count() == 6
    first = samples.first
    assert first.locator(".sample-prompt").inner_text().rstrip().endswith("### Response:")
    trained = first.locator("mark").inner_text()
    assert trained.strip() == tiny_rows(1)[0]["output"]
    assert int(first.get_attribute("data-trained-tokens")) < int(first.get_attribute("data-tokens"))
    stats = results.locator(tid("preview-stats"))
    assert stats.get_attribute("data-samples") == "6"
    assert stats.get_attribute("data-truncated") == "0"
    assert "cut at 256" in stats.inner_text().lower()

    # A cutoff shorter than the prompt cuts every sample and leaves nothing trained.
    form.locator("[name='cutoff_len']").fill("16")
    page.locator(tid("preview-run")).click()
    page.wait_for_function(
        "() => { const s = document.querySelector(\"[data-testid='preview-stats']\");"
        " return s && s.dataset.truncated === '6'; }", timeout=60000)
    assert "nothing trained" in samples.first.inner_text().lower()
    page.screenshot(path=str(fleet.home / "datasets-page.png"), full_page=True)


def test_new_job_form_previews_its_data(fleet, page):
    page.goto(fleet.url + "/jobs/new")
    page.locator("[name='base_model']").select_option("tiny")
    page.locator("[name='dataset']").select_option("tiny.json")
    page.locator("[name='format']").select_option("alpaca-format")
    page.locator("[name='cutoff_len']").fill("64")
    page.locator(tid("job-preview-run")).click()
    box = page.locator(tid("job-preview"))
    box.locator(tid("preview-stats")).wait_for(timeout=60000)
    assert box.locator(tid("preview-sample")).count() == 6
    assert box.locator(tid("preview-stats")).get_attribute("data-samples") == "6"
    assert all(int(t) <= 64 for t in
               box.locator(tid("preview-sample")).evaluate_all("els => els.map(e => e.dataset.tokens)"))
    # A bad choice comes back as a message, not samples.
    page.locator("[name='format']").select_option("")
    page.locator(tid("job-preview-run")).click()
    page.wait_for_function(
        "() => { const e = document.querySelector(\"[data-testid='job-preview'] "
        "[data-testid='preview-error']\"); return e && e.textContent.includes('format'); }",
        timeout=10000)


def test_raw_text_preview_follows_its_chunking_settings(fleet, page):
    """The raw-text fields appear with a raw text, and each of them changes the samples: the
    page shows exactly what formats.preview gives for the settings typed in."""
    from transformers import AutoTokenizer

    import formats

    blocks = CORPUS.splitlines()
    text = "\n\n\n".join(["\n".join(blocks[0:5]), "\n".join(blocks[5:9]), "Short note.",
                          "\n".join(blocks[9:])]) + "\n"
    story = fleet.settings.paths.datasets / "story.txt"
    story.write_text(text)
    tok = AutoTokenizer.from_pretrained(fleet.settings.paths.models / "tiny")
    defaults = {"cutoff_len": 256, "overlap_len": 128, "newline_favor_len": 128,
                "hard_cut_string": "\\n\\n\\n", "min_chars": 0}

    def expected(**settings) -> tuple[int, int, list[int]]:
        """(samples, tokens, tokens of each sample) that these settings give."""
        values = {**defaults, **settings}
        got = formats.preview(tokenizer=tok, raw_text_path=str(story), add_eos_token=False,
                              train_only_after="", cutoff_len=values.pop("cutoff_len"),
                              raw_text_options=formats.RawTextOptions.of(values))
        return got.stats.samples, got.stats.tokens, [len(s["input_ids"]) for s in got.samples]

    form = page.locator(tid("preview-form"))
    results = page.locator(tid("preview-results"))
    raw_fields = ("overlap_len", "newline_favor_len", "hard_cut_string", "min_chars")

    def preview(**values) -> tuple[int, int, list[int]]:
        for name, value in values.items():
            form.locator(f"[name='{name}']").fill(str(value))
        results.evaluate("box => box.replaceChildren()")  # so the next stats are the new ones
        page.locator(tid("preview-run")).click()
        results.locator(f"{tid('preview-stats')}, {tid('preview-error')}").wait_for(timeout=60000)
        error = results.locator(tid("preview-error"))
        assert not error.count(), error.inner_text()
        stats = results.locator(tid("preview-stats"))
        return (int(stats.get_attribute("data-samples")), int(stats.get_attribute("data-tokens")),
                results.locator(tid("preview-sample")).evaluate_all(
                    "els => els.map(e => Number(e.dataset.tokens))"))

    def texts() -> str:
        return "\n".join(results.locator(".sample-text").all_inner_texts())

    page.goto(fleet.url + "/datasets")
    form.locator("[name='model']").select_option("tiny")
    form.locator("[name='limit']").fill("200")  # every sample, to compare them all
    form.locator("[name='dataset']").select_option("tiny.json")
    for name in raw_fields:
        assert form.locator(f"[name='{name}']").is_hidden(), name
    form.locator("[name='raw_text_file']").select_option("story.txt")
    assert form.locator("[name='dataset']").input_value() == ""
    for name in raw_fields:
        field = form.locator(f"[name='{name}']")
        assert field.is_visible(), name
        assert field.input_value() == str(defaults[name]), name

    # The defaults: a hard cut at three newlines keeps the short block as a sample of its own.
    assert preview() == expected()
    assert "Short note." in texts()

    # Shorter chunks, no newline favouring, and blocks under 20 characters dropped. Each
    # setting counts: with any one of them at another value the samples differ.
    changed = {"cutoff_len": 32, "overlap_len": 8, "newline_favor_len": 0, "min_chars": 20}
    want = expected(**changed)
    for name, other in (("cutoff_len", 48), ("overlap_len", 0), ("newline_favor_len", 128),
                        ("min_chars", 0)):
        assert expected(**{**changed, name: other}) != want, name
    assert preview(**changed) == want
    assert want[0] > expected()[0]
    assert "Short note." not in texts()

    # A typed \n is a newline: a hard cut at every line.
    lines = {**defaults, "hard_cut_string": "\\n"}
    assert expected(**lines) != expected()
    assert preview(**lines) == expected(**lines)
    assert "Short note." in texts()

    # Settings the server refuses come back as a message naming the field.
    form.locator("[name='cutoff_len']").fill("32")
    form.locator("[name='overlap_len']").fill("40")
    page.locator(tid("preview-run")).click()
    page.wait_for_function(
        "() => { const e = document.querySelector(\"[data-testid='preview-error']\");"
        " return e && e.textContent.includes('overlap_len'); }", timeout=10000)

    # A dataset has no chunking: the fields go away again.
    form.locator("[name='dataset']").select_option("tiny.json")
    assert form.locator("[name='raw_text_file']").input_value() == ""
    for name in raw_fields:
        assert form.locator(f"[name='{name}']").is_hidden(), name


def test_view_and_copy_a_format_file(fleet, page):
    """View a shipped format's templates, copy it to a user format through the name prompt, and
    see the refusal when the same name is asked for again."""
    import formats

    alpaca = json.loads((formats.SHIPPED_DIR / "alpaca-format.json").read_text())
    page.goto(fleet.url + "/datasets")
    table = page.locator(tid("formats-table"))
    row = table.locator("[data-testid='format-row'][data-name='alpaca-format']"
                        "[data-source='shipped']")
    row.locator(tid("format-view-button")).click()
    view = page.locator(tid("format-view"))
    view.wait_for(state="visible", timeout=10000)
    assert "alpaca-format" in page.locator(tid("format-view-title")).inner_text()
    templates = view.locator(tid("format-template"))
    assert templates.evaluate_all("rows => rows.map(r => r.dataset.keys)") == list(alpaca)
    assert templates.locator("pre").all_text_contents() == list(alpaca.values())

    asked: list[tuple[str, str]] = []

    def answer(dialog):
        asked.append((dialog.type, dialog.default_value))
        dialog.accept("my-alpaca")

    page.on("dialog", answer)
    row.locator(tid("format-copy-button")).click()
    copied = table.locator("[data-testid='format-row'][data-name='my-alpaca']")
    copied.wait_for(timeout=10000)
    assert asked == [("prompt", "alpaca-format-copy")]
    assert copied.get_attribute("data-source") == "user"
    assert copied.locator("td").nth(1).inner_text() == "user"
    assert "copied alpaca-format to formats/my-alpaca.json" in \
        page.locator(tid("format-status")).inner_text()
    target = fleet.settings.paths.formats / "my-alpaca.json"
    assert json.loads(target.read_text()) == alpaca
    # The preview's format list has it without a reload.
    assert page.locator(tid("preview-format")).locator("option[value='my-alpaca']").count() == 1

    # Its own View shows the user's file.
    copied.locator(tid("format-view-button")).click()
    page.wait_for_function(
        "() => document.querySelector(\"[data-testid='format-view']\").dataset.source === 'user'",
        timeout=10000)
    assert "formats/my-alpaca.json" in page.locator(tid("format-view-title")).inner_text()

    # The same name again: refused, with the server's message, and the file is untouched.
    target.write_text(json.dumps({"instruction,output": "%instruction% => %output%"}))
    before = target.read_bytes()
    row.locator(tid("format-copy-button")).click()
    error = page.locator(tid("format-error"))
    error.wait_for(state="visible", timeout=10000)
    assert "formats/my-alpaca.json already exists" in error.inner_text()
    assert target.read_bytes() == before
    assert table.locator("[data-testid='format-row'][data-name='my-alpaca']").count() == 1
    assert len(asked) == 2
