"""Rows leave no credentials in Parquet parts: the URLs in a table's string columns (an input's
`path`, a message quoting it) lose their user-info and the values of credential-like query
parameters (`model.redact`) before a part is written. The path still identifies the image:
scheme, host, path and every other query parameter are kept, so a later command reading `path`
(pseudo-label's pairs, export) reaches the same object unless it needed the masked credential.

Checked with a vectorised search first, so a table without such URLs (nearly every one) costs
one pass of pyarrow compute per string column."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from model.redact import redact_text

# user-info before a host, or a query after a path, in a URL anywhere in the value
_SECRET = r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/'\"]*@|[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]*\?"


def redact_table(table: pa.Table) -> pa.Table:
    """`table` with every URL in its top-level string columns redacted."""
    for i, f in enumerate(table.schema):
        if not (pa.types.is_string(f.type) or pa.types.is_large_string(f.type)):
            continue
        column = table.column(i)
        if not pc.any(pc.match_substring_regex(column, _SECRET)).as_py():
            continue
        values = [redact_text(v) if v is not None else None for v in column.to_pylist()]
        table = table.set_column(i, f, pa.array(values, f.type))
    return table
