"""Files that hold records (`agencyfl.federation.files`): owner-only, and a CSV exactly as pandas writes it."""

from __future__ import annotations

import stat
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agencyfl.federation.files import _csv_by_arrow, write_private_csv

_TEXT = st.one_of(
    st.none(),
    st.sampled_from(["", " padded ", "中文 · 邀请", "a,b", 'say "no"', "two\nlines", "cr\r", "é", "1.0", "None", "#"]),
    st.text(max_size=6),
)
_FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1.0, 0.4146, 1e-05, 1e16, -0.0]))


@st.composite
def frames(draw: st.DrawFn) -> pd.DataFrame:
    n = draw(st.integers(0, 6))
    kinds = draw(st.lists(st.sampled_from(["text", "float", "int", "bool", "mixed"]), min_size=1, max_size=4))
    columns: dict[str, pd.Series] = {}
    for i, kind in enumerate(kinds):
        name = draw(st.sampled_from([f"c{i}", f"名{i}", f"c,{i}", f"c {i}"]))
        if kind == "text":
            columns[name] = pd.Series(draw(st.lists(_TEXT, min_size=n, max_size=n)), dtype=object)
        elif kind == "float":
            columns[name] = pd.Series(draw(st.lists(_FLOAT, min_size=n, max_size=n)), dtype=np.float64)
        elif kind == "int":
            columns[name] = pd.Series(
                draw(st.lists(st.integers(-(2**62), 2**62), min_size=n, max_size=n)), dtype=np.int64
            )
        elif kind == "bool":
            columns[name] = pd.Series(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
        else:
            columns[name] = pd.Series(draw(st.lists(st.one_of(_TEXT, _FLOAT), min_size=n, max_size=n)), dtype=object)
    return pd.DataFrame(columns)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(pd.DataFrame({"score": [1.0, 1e-05, np.nan], "household": pd.Series(["h1", None, ""], dtype=object)}))
@example(pd.DataFrame({"n": pd.Series([], dtype=np.int64), "t": pd.Series([], dtype=object)}))
@example(pd.DataFrame({"t": pd.Series(["a", "b"], dtype="str"), "u": pd.Series(["", "x"], dtype="str")}))
@example(pd.DataFrame({"t": pd.Series(["", "x"], dtype=object)}))  # one column: pandas quotes the empty value
@given(frames())
def test_a_csv_is_written_byte_for_byte_as_pandas_writes_it(frame: pd.DataFrame) -> None:
    """Arrow's writer is used only where it writes what ``to_csv`` writes: floats as pandas formats them,
    missing values empty, nothing quoted; a value or name that needs quotes, and any other type, is left to
    pandas. The file is the same either way, and created owner-only."""
    expected = frame.to_csv(index=False)
    fast = _csv_by_arrow(frame)
    assert fast is None or fast == expected
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "out.csv"
        write_private_csv(path, frame)
        assert path.read_bytes().decode("utf-8") == expected
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_worklist_shaped_frame_takes_the_fast_path() -> None:
    """The frame a screening writes (ids, categories, rounded scores, 0/1, missing changes) is Arrow's to write."""
    frame = pd.DataFrame({
        "household": pd.Series(["110101199003077578", "11010119900307757X"], dtype=object),
        "score": [0.4146, 1.0], "enrolled": np.array([0, 1], dtype=np.int64),
        "change": pd.Series([None, None], dtype=object), "screening": pd.Series(["scr-1", "scr-1"], dtype="str"),
    })  # fmt: skip
    assert _csv_by_arrow(frame) == frame.to_csv(index=False)
