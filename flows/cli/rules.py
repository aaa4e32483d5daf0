"""Selection and rendering, one file or one study at a time: `nightread rules check`, `rules explain`,
`render` and `inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.cli._common import console, fail, load_settings, runtime

app = typer.Typer()
rules_app = typer.Typer(help="Series and view selection rules.", no_args_is_help=True)

INSPECT_TAGS = (
    "SOPClassUID",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "PatientPosition",
    "ImageType",
    "SeriesDescription",
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "PlanarConfiguration",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "SliceThickness",
)
IDENTIFYING_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "StudyDate",
)


@rules_app.command("check")
def rules_check(file: Annotated[Path, typer.Argument(help="rules YAML")]) -> None:
    """Validate a selection rules file; print its rules, or the field that is wrong."""
    from flows.rules.selection import load_rules
    from integrations.errors import ConfigurationError

    try:
        rules = load_rules(file)
    except ConfigurationError as exc:
        raise fail(str(exc), 2) from None
    for rule in rules.rules:
        what = rule.reason if rule.action == "skip" else (f"{rule.count} per series" if rule.count else "")
        role = f" (role {rule.role})" if rule.role else ""
        console.print(f"{rule.name}: {rule.action} {what}".rstrip() + role)
    if rules.pair:
        console.print(f"pairs {rules.pair[0]} with {rules.pair[1]} images within a study")
    console.print(f"{file}: {len(rules.rules)} rules, valid (sha {rules.sha})")


@rules_app.command("explain")
def rules_explain(
    study: Annotated[
        str, typer.Argument(help="the study's database id (see `nightread status`) or its Study Instance UID")
    ],
) -> None:
    """Retrieve one study from its PACS and show which images the rules would send, and why."""
    import tempfile

    from db import repository as repo
    from db.session import session_scope
    from flows.rules.selection import select_images
    from integrations.errors import NightreadError
    from integrations.imaging import read_instance_info
    from integrations.query import uid_hash

    with runtime(load_settings()) as rt:
        rt.register_sources()
        with session_scope(rt.engine) as session:
            row = (
                repo.get_study(session=session, study_id=int(study))
                if study.isdigit()
                else repo.get_study(session=session, study_instance_uid=study)
            )
            if row is None or row.source_id is None:
                raise fail("no such study in the database (discover it first with `nightread run`)")
            uid, source_id, expected = row.study_instance_uid, row.source_id, row.expected_instances
        with tempfile.TemporaryDirectory(prefix="nightread-explain-") as tmp:
            try:
                retrieved = rt.source(source_id).retrieve_study(uid, dest=Path(tmp), expected=expected)
            except NightreadError as exc:
                raise fail(f"{type(exc).__name__}: {exc}") from None
            infos, unreadable = [], 0
            for path in retrieved.files:
                try:
                    infos.append(read_instance_info(path))
                except NightreadError:
                    unreadable += 1
            table = Table(title=f"study {row.id}: {len(retrieved.files)} instances")
            for column in ("instance", "modality", "view", "series", "number", "image type", "decision", "why"):
                table.add_column(column)
            decisions = sorted(
                select_images(infos, rt.rules), key=lambda d: (d.info.series_number or 0, d.info.instance_number or 0)
            )
            short = {d.info.sop_instance_uid: uid_hash(d.info.sop_instance_uid)[:10] for d in decisions}
            for d in decisions:
                i = d.info
                paired = f" (paired with {short.get(d.paired_with, '?')})" if d.paired_with else ""
                table.add_row(
                    uid_hash(i.sop_instance_uid)[:10],
                    i.modality,
                    i.view_position or "-",
                    str(i.series_number or "-"),
                    str(i.instance_number or "-"),
                    "\\".join(i.image_type),
                    "send" if d.selected else "skip",
                    f"{d.rule}: {d.reason}{paired}",
                )
            console.print(table)
            if unreadable:
                console.print(f"{unreadable} instance(s) could not be read and would be recorded as failures")


@app.command()
def render(
    source: Annotated[Path, typer.Argument(help="a DICOM file")],
    out: Annotated[Path, typer.Option(help="PNG to write")] = Path("out.png"),
    frame: Annotated[int | None, typer.Option(help="frame of a multi-frame image (default: the flows' choice)")] = None,
) -> None:
    """Render one file through exactly the pipeline the flows use, and say what happened."""
    from flows.rules.selection import load_rules, select_images
    from integrations.errors import DecodeError
    from integrations.imaging import default_frame, read_instance_info
    from integrations.imaging import render as render_image

    settings = load_settings()
    try:
        info = read_instance_info(source)
    except DecodeError as exc:
        raise fail(f"failed (read): {exc}") from None
    (decision,) = select_images([info], load_rules(settings.rules_file))
    # the flows' choice: the middle of the frames the rules picked (or of the object, when not selected)
    chosen = (
        frame
        if frame is not None
        else default_frame(info.number_of_frames, decision.frames if decision.selected else ())
    )
    try:
        rendered = render_image(
            source, frame=chosen, max_long_edge=settings.render.max_long_edge, ct_windows=settings.render.ct_windows
        )
    except DecodeError as exc:
        raise fail(f"failed (render): {exc}") from None
    out.write_bytes(rendered.png)
    console.print(
        f"rendered {out} ({rendered.width}x{rendered.height}, frame {chosen}, render version "
        f"{rendered.render_version}): {' → '.join(rendered.steps)}"
    )
    console.print(
        f"selection: {'selected' if decision.selected else 'skipped'} by rule {decision.rule!r} ({decision.reason})"
    )


@app.command()
def inspect(
    source: Annotated[Path, typer.Argument(help="a DICOM file")],
    show_identifiers: Annotated[bool, typer.Option(help="also print patient and study identifiers")] = False,
) -> None:
    """The tags that drive selection and rendering (no identifiers unless --show-identifiers)."""
    from pydicom import dcmread
    from pydicom.uid import UID

    try:
        ds = dcmread(source, force=True, defer_size="4 KB")
    except Exception as exc:
        raise fail(f"cannot read {source}: {type(exc).__name__}") from None
    table = Table(title=str(source.name), show_header=False)
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    table.add_row("TransferSyntaxUID", f"{UID(ts).name} ({ts})" if ts else "(none: no file meta)")
    for keyword in INSPECT_TAGS + (IDENTIFYING_TAGS if show_identifiers else ()):
        if keyword in ds:
            value = ds.get(keyword)
            text = UID(str(value)).name if keyword == "SOPClassUID" else str(value)
            table.add_row(keyword, text)
    for keyword in ("VOILUTSequence", "ModalityLUTSequence", "PixelData"):
        table.add_row(keyword, "present" if keyword in ds else "absent")
    console.print(table)


app.add_typer(rules_app, name="rules")
