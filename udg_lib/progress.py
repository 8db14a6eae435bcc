"""Progress bars that read right both while a notebook runs and in its saved, executed copy.

A person running a notebook in JupyterLab watches tqdm's widget bars (`tqdm.auto`). A saved widget reads
badly: an executed notebook opened on another machine is untrusted, so JupyterLab shows each widget's text
fallback, which is the bar's *first* state (`generate smollm2:   0%|          | 0/13`) for a loop that
finished. So the stage runner (`udg_lib.pipeline`) starts each stage's kernel with `UDG_PROGRESS=text`:
`progress_bar` then gives tqdm's plain text bar (on stderr), and the runner keeps only each bar's last state
in the executed copy (`settle_stream_outputs`: the carriage returns resolved as a terminal would), e.g.
`generate smollm2: 100%|██████████| 13/13 [00:05<00:00,  2.41it/s]`, the same trusted or not, and on
GitHub. Every bar of `udg_lib` goes through `progress_bar`, so this choice lives here alone.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable
from typing import Any

PROGRESS_ENV = "UDG_PROGRESS"  # "text": plain text bars even in a notebook kernel (the runner's kernels)
TEXT_BARS = "text"

# Everything on a line up to a carriage return that more text on that line overwrites (nbclient's rule).
_OVERWRITTEN = re.compile(r"[^\n]*\r(?=[^\n])")
_OVERWRITES_LINE = re.compile(r"[^\n]*\r[^\n]")  # the first line holds a carriage return that text follows


def progress_bar(iterable: Iterable | None = None, **options: Any):
    """A tqdm bar: a widget in a notebook, plain text in a terminal or where `UDG_PROGRESS=text`."""
    if os.environ.get(PROGRESS_ENV) == TEXT_BARS:
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm(iterable, **options)


def settle_stream_outputs(outputs: list[dict]) -> list[dict]:
    """A cell's outputs with each stream's carriage returns resolved, so a text bar keeps its last state.

    Per stream (stdout, stderr), text that a later carriage return overwrites is dropped, also across outputs
    (a bar is written as many small outputs, possibly between other ones); consecutive outputs of one stream
    are joined, as JupyterLab shows them. The order of the outputs is kept. Returns a new list; outputs other
    than streams are the same objects.
    """
    settled: list[dict] = []
    open_line: dict[str, tuple[dict, int]] = {}  # stream -> (output, start of its unfinished last line)
    for output in outputs:
        if output.get("output_type") != "stream":
            settled.append(output)
            continue
        name, text = output["name"], _text(output)
        previous = settled[-1] if settled else None
        if previous is not None and previous.get("output_type") == "stream" and previous["name"] == name:
            target = previous
            target["text"] = _OVERWRITTEN.sub("", target["text"] + text)
        else:
            if name in open_line:  # an earlier output of this stream left its last line unfinished
                earlier, start = open_line[name]
                if _OVERWRITES_LINE.match(earlier["text"][start:] + text):
                    earlier["text"] = earlier["text"][:start]
            target = copy.copy(output)  # the caller's outputs stay as they were
            target["text"] = _OVERWRITTEN.sub("", text)
            settled.append(target)
        if target["text"].endswith("\n"):
            open_line.pop(name, None)
        else:
            open_line[name] = (target, target["text"].rfind("\n") + 1)
    return [output for output in settled if output.get("output_type") != "stream" or output["text"]]


def _text(output: dict) -> str:
    text = output.get("text", "")
    return "".join(text) if isinstance(text, list) else text
