"""Data commands (`lorafleet data ...`): list, upload, show and copy format files through the
dashboard, and `preview` the samples the trainer will see, locally (no Redis, GPU or server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from dispatcher.access.owners import NO_ONE
from dispatcher.cli.client import Client
from dispatcher.cli.common import api_errors, url_option


@click.group()
def data() -> None:
    """Datasets, format files and raw texts: list, upload, view and copy formats (through the
    dashboard), and preview samples the way the trainer will see them (locally)."""


def _owner(entry: dict[str, Any]) -> str:
    """Who made it; NO_ONE: no one (put there by hand, or shipped)."""
    return f"{entry.get('owner') or NO_ONE:<12}"


@data.command("list")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@url_option
@api_errors()
def data_list(as_json: bool, url: str) -> None:
    """The data folder's datasets, format files (yours and the shipped ones) and raw texts."""
    listing = Client(url).data_files()
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    click.echo("datasets:")
    for d in listing.get("datasets", []):
        what = d["error"] if d.get("error") else f"{d.get('rows')} rows"
        click.echo(f"  {d['name']:<40} {what:<12} {_owner(d)}".rstrip())
    click.echo("format files:")
    for f in listing.get("formats", []):
        hidden = ", hidden by a file in formats/" if f.get("hidden_by_user_file") else ""
        what = f["error"] if f.get("error") else " | ".join(f.get("key_sets", []))
        click.echo(f"  {f['name']:<32} {f.get('source', ''):<8}{_owner(f)}{hidden} {what}")
    click.echo("raw texts:")
    for r in listing.get("raw_texts", []):
        click.echo(f"  {r['name']:<40} {_owner(r)}".rstrip())


@data.command("upload")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--kind", type=click.Choice(["dataset", "format", "raw_text"]), default=None,
              help="what the file is (default: from its name: .txt raw text, *-format.json or "
                   "*_format.json a format file, other .json/.jsonl a dataset)")
@click.option("--overwrite", is_flag=True, help="replace a file of the same name")
@url_option
@api_errors()
def data_upload(file: str, kind: str | None, overwrite: bool, url: str) -> None:
    """Upload a dataset, format file or raw text into the data folder. It is checked in full
    first: a bad file is refused with its row and reason, and nothing is written."""
    saved = Client(url).upload(file, kind or "", overwrite)
    rows = f", {saved['rows']} rows" if saved.get("rows") is not None else ""
    click.echo(f"{'replaced' if saved.get('replaced') else 'saved'} {saved['path']} "
               f"({saved['kind']}{rows})")


@data.command("show-format")
@click.argument("name")
@click.option("--source", type=click.Choice(["user", "shipped"]), default=None,
              help="the shipped file even where your own file of that name hides it")
@click.option("--json", "as_json", is_flag=True, help="print the format file's JSON")
@url_option
@api_errors()
def data_show_format(name: str, source: str | None, as_json: bool, url: str) -> None:
    """A format file's templates, in the order rows are matched against them."""
    fmt = Client(url).format_file(name, source or "")
    templates = fmt.get("templates", {})
    if as_json:
        click.echo(json.dumps({k: templates[k] for k in fmt.get("key_sets", templates)},
                              indent=2, ensure_ascii=False))
        return
    click.echo(f"{fmt['name']} ({fmt.get('source')}: {fmt.get('file')})")
    for keys in fmt.get("key_sets", list(templates)):
        click.echo(f"\n[{keys}]\n{templates.get(keys, '')}")


@data.command("copy-format")
@click.argument("source_name")
@click.argument("new_name")
@click.option("--overwrite", is_flag=True, help="replace your format file of that name")
@click.option("--source", type=click.Choice(["user", "shipped"]), default=None,
              help="copy the shipped file even where your own file of that name hides it")
@url_option
@api_errors()
def data_copy_format(source_name: str, new_name: str, overwrite: bool, source: str | None,
                     url: str) -> None:
    """Copy a format file (a shipped one, or yours) to formats/NEW_NAME.json to edit it."""
    made = Client(url).copy_format(source_name, new_name, overwrite, source or "")
    click.echo(f"copied {source_name} to formats/{made.get('file', new_name)}")


@data.command("preview")
@click.option("--tokenizer", "tokenizer_path", required=True,
              type=click.Path(exists=True, file_okay=False), help="tokenizer or model folder")
@click.option("--dataset", type=click.Path(exists=True, dir_okay=False), help="JSON/JSONL dataset")
@click.option("--format", "format_path", type=click.Path(exists=True, dir_okay=False),
              help="format file for --dataset")
@click.option("--raw-text", type=click.Path(exists=True), help="a .txt file or a folder of them")
@click.option("--cutoff-len", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--overlap-len", default=128, show_default=True, type=click.IntRange(min=0))
@click.option("--newline-favor-len", default=128, show_default=True, type=click.IntRange(min=0))
@click.option("--hard-cut-string", default="\\n\\n\\n", show_default=True,
              help="\\n means a newline")
@click.option("--add-eos-token", is_flag=True)
@click.option("--train-only-after", default="")
@click.option("--min-chars", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=0),
              help="samples to show (0 = all)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per sample per line")
@click.option("--stats", "with_stats", is_flag=True,
              help='end with one JSON line {"stats": {...}} of totals over all samples')
def data_preview(tokenizer_path: str, dataset: str | None, format_path: str | None,
                 raw_text: str | None, cutoff_len: int, overlap_len: int, newline_favor_len: int,
                 hard_cut_string: str, add_eos_token: bool, train_only_after: str,
                 min_chars: int, limit: int, as_json: bool, with_stats: bool) -> None:
    """Show the training samples a dataset + format (or a raw-text file) gives.

    Needs no Redis, GPU or running server. With --json each sample line also carries its token
    counts and its text decoded back from the ids, split where training starts: "prompt_text"
    (masked by --train-only-after) and "trained_text" (what the loss sees), so a page can
    highlight the trained part; special tokens (BOS, EOS) are kept in both, as trained.
    """
    if bool(raw_text) == bool(dataset):
        raise click.UsageError("give either --dataset with --format, or --raw-text")
    if dataset and not format_path:
        raise click.UsageError("--dataset needs --format")
    if raw_text and overlap_len >= cutoff_len:
        raise click.UsageError(f"--overlap-len ({overlap_len}) must be less than "
                               f"--cutoff-len ({cutoff_len})")
    # Raw text is a .txt file or a folder of them (whose other files formats.raw_text_files
    # skips); a single file of another kind is a mistake, such as a dataset given here.
    if raw_text and Path(raw_text).is_file() and Path(raw_text).suffix.lower() != ".txt":
        raise click.UsageError(f"--raw-text {raw_text}: not a .txt file (raw text is a .txt "
                               "file or a folder of them; for a JSON dataset use --dataset "
                               "with --format)")
    # Imported here: the pure data code and the tokenizer library are only needed by this command.
    import formats
    from formats.previewer import PreviewFailed, PreviewRequest, run

    req = PreviewRequest(
        tokenizer=tokenizer_path, dataset=dataset, format=format_path, raw_text=raw_text,
        cutoff_len=cutoff_len, raw_text_options=formats.RawTextOptions(
            overlap_len, newline_favor_len, hard_cut_string, min_chars),
        add_eos_token=add_eos_token, train_only_after=train_only_after, limit=limit)
    try:
        res = run(req)
    except (formats.FormatError, PreviewFailed) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        for row in res.samples:
            click.echo(json.dumps(row, ensure_ascii=False))
    else:
        _print_table(res.samples, res.stats, formats.format_table)
    if with_stats:
        click.echo(json.dumps({"stats": res.stats}))


def _print_table(rows: list[dict], st: dict, format_table) -> None:
    click.echo(format_table(rows))
    click.echo(f"\n{st['samples']} samples, {st['tokens']} tokens, {st['trained_tokens']} "
               f"trained, {st['truncated']} cut at {st['cutoff_len']}, longest {st['longest']}"
               + (f", {st['untrained']} with nothing to train" if st["untrained"] else "")
               + (f" (showing {st['shown']})" if st["shown"] < st["samples"] else ""))


COMMANDS = (data,)
