"""Progress bars that read right both while a notebook runs and in its saved, executed copy.

A person running a notebook in JupyterLab watches tqdm's widget bars (`tqdm.auto`). A saved widget reads
badly: an executed notebook opened on another machine is untrusted, so JupyterLab shows each widget's text
fallback, which is the bar's *first* state (`generate smollm2:   0%|          | 0/13`) for a loop that
finished. So the stage runner (`udg_lib.pipeline`) starts each stage's kernel with `UDG_PROGRESS=text`:
`progress_bar` then gives tqdm's plain text bar (on stderr), and the runner keeps only each bar's last state
in the executed copy (`settle_stream_outputs`: the carriage returns resolved as a terminal would), e.g.
`generate smollm2: 100%|██████████| 13/13 [00:05<00:00,  2.41it/s]`, the same trusted or not, and on
GitHub. Every bar of `udg_lib` goes through `progress_bar`, so this choice lives here alone. Other libraries'
bars (transformers' "Loading weights") stay widgets; the runner rewrites their text fallback to their last
state, read from the widget state saved in the notebook (`settle_widget_bars`).
"""

from __future__ import annotations

import copy
import html
import os
import re
from collections.abc import Iterable
from typing import Any

PROGRESS_ENV = "UDG_PROGRESS"  # "text": plain text bars even in a notebook kernel (the runner's kernels)
TEXT_BARS = "text"

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"  # an output that shows a widget
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"  # the saved state, in the notebook's metadata
BAR_WIDTH = 10  # characters of a text bar without a terminal width (tqdm's default)

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


def settle_widget_bars(notebook: dict) -> int:
    """Set the text fallback of each tqdm widget bar in an executed notebook to the bar's last state; return
    how many were set.

    A tqdm widget is an HBox of (HTML: description and percentage, FloatProgress, HTML: counts and rates); the
    state nbclient saves under `metadata.widgets` holds their last values, from which the text bar is rebuilt as
    tqdm writes it (`left|██████████|right`). Other widgets, and bars whose state was not saved, are left alone.
    """
    models = notebook.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    settled = 0
    for cell in notebook.get("cells", []):
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            text = view and tqdm_widget_text(models, view.get("model_id", ""))
            if text:
                output["data"]["text/plain"] = text
                settled += 1
    return settled


def tqdm_widget_text(models: dict, model_id: str) -> str | None:
    """The text of the tqdm widget bar `model_id` in saved widget state `models`; None if it is not one."""
    from tqdm.std import Bar

    box = models.get(model_id, {})
    children = [models.get(ref.removeprefix("IPY_MODEL_"), {}) for ref in box.get("state", {}).get("children", [])]
    kinds = [child.get("model_name") for child in children]
    if box.get("model_name") != "HBoxModel" or kinds != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    left, progress, right = (child["state"] for child in children)
    total, done = progress.get("max") or 0, progress.get("value") or 0
    bar = format(Bar(min(1.0, done / total) if total else 0.0, BAR_WIDTH, charset=Bar.UTF), "")
    return f"{_plain(left)}|{bar}|{_plain(right)}"


def _plain(html_model: dict) -> str:
    """An HTML widget's text as tqdm wrote it: unescaped, figure spaces (its padding in HTML) back to spaces."""
    return html.unescape(html_model.get("value", "")).replace("\u2007", " ")
