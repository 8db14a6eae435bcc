import io

import pytest
import tqdm.notebook
import tqdm.std

from udg_lib.progress import PROGRESS_ENV, progress_bar, settle_stream_outputs


def stream(name: str, text: str) -> dict:
    return {"output_type": "stream", "name": name, "text": text}


TABLE = {"output_type": "display_data", "data": {"text/plain": "a table"}, "metadata": {}}


def test_text_bars_where_the_runner_asks_for_them(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "text")
    out = io.StringIO()
    bar = progress_bar(range(3), desc="users", file=out)
    assert type(bar) is tqdm.std.tqdm and not isinstance(bar, tqdm.notebook.tqdm)
    assert list(bar) == [0, 1, 2]
    assert out.getvalue().rsplit("\r", 1)[-1].startswith("users: 100%|##########| 3/3")  # ascii: StringIO


def test_outside_a_notebook_the_bar_is_tqdms_own(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    with progress_bar(total=2, file=io.StringIO()) as bar:  # tqdm.auto: the text bar outside a kernel
        bar.update(2)
    assert isinstance(bar, tqdm.std.tqdm) and bar.n == 2


def test_a_text_bar_keeps_its_last_state():
    bar = [stream("stderr", "\rgen:   0%|          | 0/13"), stream("stderr", "\rgen:  46%|████▌     | 6/13"),
           stream("stderr", "\rgen: 100%|██████████| 13/13"), stream("stderr", "\n")]
    assert settle_stream_outputs(bar) == [stream("stderr", "gen: 100%|██████████| 13/13\n")]


def test_a_bar_interrupted_by_other_outputs_keeps_its_last_state_and_the_order():
    outputs = [stream("stdout", "start\n"), stream("stderr", "\rgen:   0%| 0/2"), stream("stdout", "user a\n"),
               stream("stderr", "\rgen:  50%| 1/2"), TABLE, stream("stderr", "\rgen: 100%| 2/2\n"),
               stream("stdout", "done\n")]
    assert settle_stream_outputs(outputs) == [
        stream("stdout", "start\n"), stream("stdout", "user a\n"), TABLE, stream("stderr", "gen: 100%| 2/2\n"),
        stream("stdout", "done\n"),
    ]
    assert outputs[1] == stream("stderr", "\rgen:   0%| 0/2")  # the caller's list is left as it was


@pytest.mark.parametrize(
    ("texts", "settled"),
    [
        (["a\nb\n", "c\n"], "a\nb\nc\n"),  # plain lines are joined, nothing lost
        (["line\n\rx 0%", "\rx 100%\n"], "line\nx 100%\n"),  # only the unfinished line is rewritten
        (["abc\r", "def\n"], "def\n"),  # a carriage return at the end of one output, text in the next
        (["ends with a windows newline\r\n"], "ends with a windows newline\r\n"),
    ],
)
def test_carriage_returns_resolve_as_a_terminal_shows_them(texts, settled):
    assert settle_stream_outputs([stream("stderr", text) for text in texts]) == [stream("stderr", settled)]
