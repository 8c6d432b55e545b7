"""`agencyfl steward`: commands run inside an agency's domain."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from agencyfl.cli.common import (
    Format,
    FormatOpt,
    emit_json,
    errors_to_exit,
    out,
    steward_app,
)


# ---------------------------------------------------------------- steward
@steward_app.command("check")
def steward_check(
    spec: Annotated[Path, typer.Option(help="The federation spec (TOML)")],
    agency: Annotated[str, typer.Option(help="Your agency's name in the spec")],
    data: Annotated[Path, typer.Option(help="Your data file (CSV or Parquet)")],
    fmt: FormatOpt = Format.table,
) -> None:
    """Validate every row of a data file; bad rows go to NAME.quarantine.csv beside it."""
    from federation.spec import load_spec
    from federation.table import load_table

    with errors_to_exit():
        loaded = load_spec(spec)
        loaded.spec.agency(agency)
        check = load_table(data, loaded.spec.schema)
    reasons: dict[str, int] = {}
    for reason in check.quarantined.get("reason", []):
        for part in str(reason).split("; "):
            key = re.sub(r"'[^']*'", "<value>", part, count=1)
            reasons[key] = reasons.get(key, 0) + 1
    label = loaded.spec.schema.label
    report = {
        "agency": agency,
        "data": str(data),
        "rows": check.total,
        "valid": len(check.valid),
        "quarantined": len(check.quarantined),
        "quarantine_file": str(check.quarantine_path) if check.quarantine_path else None,
        "label_rate": float(check.valid[label].mean()) if len(check.valid) else None,
        "absent_columns": check.absent_columns,
        "missing_share": {f.name: float(check.valid[f.name].isna().mean()) for f in loaded.spec.schema.features}
        if len(check.valid)
        else {},
        "fingerprint": check.fingerprint,
        "reasons": reasons,
    }
    if fmt is Format.json:
        emit_json(report)
        return
    out.print(
        f"[bold]{agency}[/]: {check.total} rows read, {len(check.valid)} valid, {len(check.quarantined)} quarantined"
    )
    if check.quarantine_path:
        out.print(f"quarantine file: {check.quarantine_path} (row number and reason for each)")
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
            out.print(f"  {count:>5}  {reason}")
    if check.absent_columns:
        out.print(f"columns not in the file (treated as unknown): {', '.join(check.absent_columns)}")
    if report["label_rate"] is not None:
        out.print(f"eligible share among valid rows: {report['label_rate']:.1%}")
    out.print(f"dataset fingerprint: {check.fingerprint[:16]}…  (the input file was not modified)")
