"""The report's "Privacy attacks" section, from the results ``potluck attack`` leaves in a
run's ``attacks/`` directory: each gradient inversion's quality with the original and the
reconstructed images (embedded), and the membership attacks' ROC and TPR at low FPR.

Example:
    >>> import tempfile
    >>> attack_section(Path(tempfile.mkdtemp()))  # no attacks: no section
    ''
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from potluck.report.svg import Panel, panels

ATTACKS_DIR = "attacks"


def results(run_dir: Path) -> list[dict[str, Any]]:
    """Every attack result stored in ``run_dir/attacks`` (JSON files), by file name; a file
    that is not a potluck attack result is skipped."""
    folder = Path(run_dir) / ATTACKS_DIR
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("attack") in ("inversion", "membership"):
            out.append({**data, "_dir": path.parent})
    return out


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "inf"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def _image(folder: Path, name: str | None, alt: str) -> str:
    if not name:
        return ""
    path = folder / name
    if not path.is_file():
        return f"<em>({html.escape(name)} missing)</em>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _inversions(rows: list[dict[str, Any]]) -> str:
    head = (
        "<tr><th>round</th><th>client</th><th>method</th><th>update seen by the server</th>"
        "<th>examples</th><th>PSNR dB</th><th>SSIM</th><th>label acc</th></tr>"
    )
    body, figures = [], []
    for r in rows:
        cells = [r.get("round"), r.get("client"), r.get("method"), r.get("protection")]
        cells += [r.get("batch"), r.get("psnr"), r.get("ssim"), r.get("label_accuracy")]
        body.append("<tr>" + "".join(f"<td>{_num(c)}</td>" for c in cells) + "</tr>")
        images = r.get("images", {})
        what = f"round {r.get('round')}, client {r.get('client')}, {r.get('method')}"
        figures.append(
            '<figure class="attack">'
            + _image(r["_dir"], images.get("original"), f"original examples, {what}")
            + "<br>"
            + _image(r["_dir"], images.get("reconstruction"), f"reconstruction, {what}")
            + f"<figcaption>top: the client's examples; below: {html.escape(what)} "
            + f"(PSNR {_num(r.get('psnr'))} dB)</figcaption></figure>"
        )
    return (
        "<h3>Gradient inversion</h3><p>Reconstructions of a client's training examples from "
        "its update as the server decoded it.</p>"
        f"<table>{head}{''.join(body)}</table>{''.join(figures)}"
    )


def _membership(result: dict[str, Any]) -> str:
    head = (
        "<tr><th>method</th><th>AUC</th><th>advantage</th><th>TPR at 1% FPR</th>"
        "<th>TPR at 0.1% FPR</th></tr>"
    )
    body = []
    for method, row in result.get("methods", {}).items():
        cells = [method, row.get("auc"), row.get("advantage")]
        cells += [row.get("tpr_at_1%_fpr"), row.get("tpr_at_0.1%_fpr")]
        body.append("<tr>" + "".join(f"<td>{_num(c)}</td>" for c in cells) + "</tr>")
    curves = {m: (c["fpr"], c["tpr"]) for m, c in result.get("roc", {}).items()}
    svg = panels(
        "ROC of the membership attacks",
        [Panel("true positive rate", curves, xlabel="false positive rate")],
    )
    target = result.get("target", {})
    setting = (
        f"{result.get('members')} members and {result.get('nonmembers')} non-members "
        f"({html.escape(str(result.get('unit')))}), {result.get('shadows')} shadow models "
        f"over {result.get('users')} users. The model's loss: members "
        f"{_num(target.get('member_loss'))}, non-members {_num(target.get('nonmember_loss'))};"
        f" accuracy {_num(target.get('member_accuracy'))} and "
        f"{_num(target.get('nonmember_accuracy'))}."
    )
    return (
        "<h3>Membership inference</h3>"
        f"<p>Against the final global model: {setting}</p>"
        f"<table>{head}{''.join(body)}</table><figure>{svg}</figure>"
    )


def attack_section(run_dir: Path) -> str:
    """The HTML section of the run's attack results, or ``""`` when it has none."""
    found = results(run_dir)
    if not found:
        return ""
    inversions = [r for r in found if r["attack"] == "inversion"]
    parts = ["<h2>Privacy attacks</h2>"]
    if inversions:
        parts.append(_inversions(inversions))
    parts += [_membership(r) for r in found if r["attack"] == "membership"]
    return "".join(parts)
