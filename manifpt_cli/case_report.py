"""Stage 6, for people: one self-contained HTML case report (README, "Case reports").

The file needs nothing but a browser: pictures are inlined as ``data:`` PNGs, the script and
styles are inline, and a Content-Security-Policy forbids every other resource, so opening it
fetches nothing from anywhere. The summary, provenance, model card and limitations are static
HTML (they print and read without JavaScript); the per-suspect table is drawn by a small inline
script from a JSON block, a page at a time, so 5,000 suspects open quickly.

Every string that comes from outside (file names, labels, notes) reaches the page either through
:func:`html.escape` or as JSON that the script only ever puts into ``textContent`` and attribute
values, never into markup: a file named ``<script>…`` shows as text.

Rows are spooled to a temporary file as they come, so memory does not grow with the case.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from collections import Counter
from typing import TextIO

from .evidence import Evidence
from .formats import utc_now

PICTURES = ("suspect", "nearest", "artifact", "spectrum")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)


def script_json(value: object) -> str:
    """JSON that is safe inside a ``<script>`` element (no ``<``, ``>``, ``&`` or line separators)."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028")):
        text = text.replace(char, escaped)
    return text.replace("\u2029", "\\u2029")


def evidence_record(evidence: Evidence | None) -> dict | None:
    """The JSON form of a row's pictures: base64 PNGs, the artifact's caption, and why any is missing."""
    if evidence is None:
        return None
    pictures = {name: getattr(evidence, name) for name in PICTURES}
    return {
        "png": {name: base64.b64encode(data).decode("ascii") for name, data in pictures.items() if data},
        "artifact_caption": evidence.artifact_caption,
        "missing": evidence.missing,
    }


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(rows: list[tuple[object, object]], head: tuple[str, str] | None = None) -> str:
    """A two-column table of (name, value) pairs, every cell escaped."""
    header = f"<thead><tr><th>{_e(head[0])}</th><th>{_e(head[1])}</th></tr></thead>" if head else ""
    body = "".join(f"<tr><th scope='row'>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{header}<tbody>{body}</tbody></table>"


def _figure(value: object, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "—" if value in (None, "") else str(value)


class CaseReport:
    """Collects rows (with their pictures) and writes the case report to ``stream`` on :meth:`close`."""

    def __init__(self, stream: TextIO, header: dict, *, spool_dir: str | None = None) -> None:
        self.stream = stream
        self.header = header
        self.spool = tempfile.TemporaryFile("w+", encoding="utf-8", dir=spool_dir, suffix=".manifpt-spool")
        self.count = 0
        self.shared_pictures: dict[str, int] = {}  # a nearest real image shown for many suspects is stored once
        self.status = Counter()
        self.verdicts = Counter()
        self.predicted = Counter()

    def write_record(self, record: dict, evidence: dict | None) -> None:
        """One row in its JSON report form (:func:`manifpt_cli.report.row_record`) and its pictures."""
        if evidence and "nearest" in evidence["png"]:
            png = evidence["png"].pop("nearest")
            evidence["nearest_picture"] = self.shared_pictures.setdefault(png, len(self.shared_pictures))
        self.spool.write(("," if self.count else "") + script_json({**record, "evidence": evidence}) + "\n")
        self.count += 1
        self.status[record["status"]] += 1
        if record["status"] == "ok":
            self.verdicts[record["verdict"]] += 1
            self.predicted[record["predicted"]] += 1

    def close(self, finished_utc: str | None = None) -> None:
        """Write the whole page; ``finished_utc`` is when the run ended (a re-rendered report keeps its own)."""
        finished = self.header.get("finished_utc") or finished_utc or utc_now()
        write = self.stream.write
        write(_page_head(self.header, self.count))
        write(self._summary(finished))
        write(_how_to_read(self.header))
        write(_provenance(self.header, finished))
        write(_model_card(self.header.get("model_card") or {}))
        write(_limitations(self.header))
        write(_SUSPECTS_SECTION)
        write("<script type='application/json' id='manifpt-rows'>[")
        self.spool.seek(0)
        for line in self.spool:
            write(line)
        write("]</script>\n<script type='application/json' id='manifpt-shared-pictures'>")
        write(script_json(list(self.shared_pictures)))
        write("</script>\n<script>" + _SCRIPT + "</script>\n</body>\n</html>\n")
        self.spool.close()
        self.stream.flush()

    def _summary(self, finished: str) -> str:
        header = self.header
        ok = self.status["ok"]
        lines = [
            f"<p class='lead'>{ok} of {self.count} files attributed; {self.status['error']} could not be "
            f"attributed; {self.status['skipped']} skipped (not image files). Model space "
            f"<b>{_e(header.get('space', ''))}</b>, {len(header.get('classes', []))} known classes.</p>"
        ]
        share = (lambda n: f"{n} ({n / ok:.1%})") if ok else str
        verdicts = [(name, share(n)) for name, n in self.verdicts.most_common()]
        predicted = [(name, share(n)) for name, n in self.predicted.most_common()]
        lines.append("<div class='cols'>")
        lines.append("<div><h3>Verdicts</h3>" + _table(verdicts or [("none", "")], ("verdict", "suspects")) + "</div>")
        lines.append(
            "<div><h3>Most likely source</h3>"
            + _table(predicted or [("none", "")], ("predicted", "suspects"))
            + "<p class='small'>The top-ranked class before the verdict rule; see the verdict for what the "
            "tool concludes.</p></div>"
        )
        statuses = [(name, n) for name, n in self.status.most_common()]
        lines.append("<div><h3>Files</h3>" + _table(statuses, ("status", "files")) + "</div></div>")
        operator = header.get("operator") or {}
        lines.append(
            f"<p class='small'>Run by {_e(operator.get('name', 'unknown'))} ({_e(operator.get('source', ''))}), "
            f"started {_e(header.get('created_utc', ''))}, finished {_e(finished)}.</p>"
        )
        return "<section id='summary'><h2>Summary</h2>" + "".join(lines) + "</section>\n"


def _page_head(header: dict, count: int) -> str:
    title = f"manifpt case report: {count} files, {header.get('created_utc', '')}"
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CONTENT_SECURITY_POLICY}\">\n"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
        f"<meta name='generator' content='manifpt {_e(header.get('manifpt_version', ''))}'>\n"
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        "<header><h1>Generative-model attribution: case report</h1>"
        f"<p class='small'>manifpt {_e(header.get('manifpt_version', ''))} (ManiFPT, Song et al., CVPR 2024). "
        "This file is self-contained: it loads nothing from any network or disk.</p></header>\n"
    )


def _bound_words(rule: dict) -> str:
    """What the threshold promises for new images of the known sources (models that record it)."""
    bound = rule.get("false_alarm_bound")
    if bound is None:
        return " on validation images"
    return f": a new image of a known source falls below it with probability at most {_e(_figure(bound))}"


def _uncalibrated_words(header: dict) -> str:
    if not (header.get("calibration") or {}).get("temperature_at_bound"):
        return ""
    return (
        "<b>This model's temperature stopped at the end of its range</b>: its validation images were "
        "separated perfectly, so they could not calibrate it, and probabilities near 1 overstate the "
        "certainty. "
    )


def _how_to_read(header: dict) -> str:
    rule = header.get("verdict_rule") or {}
    inconclusive = "".join(f"<li>{_e(reason)}</li>" for reason in rule.get("inconclusive_when", []))
    classes = ", ".join(header.get("classes", []))
    return (
        "<section id='reading'><h2>How to read a verdict</h2><ol>"
        f"<li><b>inconclusive</b> when a note says the image is outside what the model was validated on:<ul>"
        f"{inconclusive}</ul></li>"
        f"<li><b>unknown</b> ({_e(rule.get('unknown_means', ''))}) when the open-set score "
        f"({_e(rule.get('open_set_score', ''))}) is below {_e(_figure(rule.get('threshold')))}, the threshold "
        f"set for a {_e(_figure(rule.get('target_fpr')))} false-alarm rate{_bound_words(rule)};</li>"
        f"<li>otherwise the most probable of the known classes: {_e(classes)}.</li></ol>"
        "<p>The <b>probability</b> is calibrated (temperature scaling on held-out validation images): among "
        "the validation images it was fitted on, those given 0.9 were right about 90 % of the time. "
        f"{_uncalibrated_words(header)}The "
        "<b>distance to real</b> is the squared L2 distance from the suspect to its nearest real image in the "
        "model's space; the <b>artifact</b> is their difference, the input the attributor judges.</p></section>\n"
    )


def _provenance(header: dict, finished: str) -> str:
    verification = header.get("verification") or {}
    search = header.get("search") or {}
    operator = header.get("operator") or {}
    rows = [
        ("operator", f"{operator.get('name', 'unknown')} ({operator.get('source', '')})"),
        ("started (UTC)", header.get("created_utc", "")),
        ("finished (UTC)", finished),
        ("suspect folders and files", "; ".join(header.get("suspects", []))),
        ("model", header.get("model", "")),
        ("model SHA-256", header.get("model_sha256", "")),
        ("model check", (verification.get("model") or {}).get("result", "")),
        ("index", header.get("index", "")),
        ("index hash", header.get("index_hash", "")),
        ("index check", (verification.get("index") or {}).get("result", "")),
        ("embedding space, image size", f"{header.get('space', '')}, {header.get('image_size', '')} px"),
        (
            "nearest-neighbour search",
            f"{search.get('faiss_factory', '')} ({'exact' if search.get('exact') else 'APPROXIMATE'}"
            f"{', ' + json.dumps(search.get('parameters')) if search.get('parameters') else ''})",
        ),
        ("engine", header.get("engine", "")),
        ("settings", json.dumps(header.get("settings", {}), ensure_ascii=False)),
        ("library versions", ", ".join(f"{k} {v}" for k, v in (header.get("versions") or {}).items())),
    ]
    if header.get("rendered_from"):
        rows.append(("rendered from", header["rendered_from"]))
    return "<section id='provenance'><h2>Provenance</h2>" + _table(rows) + "</section>\n"


def _unknown_shares(card: dict, open_set: dict) -> list[tuple[str, str]]:
    """The row of each class's validation images called unknown (the threshold is pooled over them)."""
    shares = open_set.get("validation_unknown_share")
    if not shares:
        return []
    named = ", ".join(f"{label} {_figure(share)}" for label, share in zip(card.get("classes", []), shares))
    return [("validation images called unknown, per class", named)]


def _model_card(card: dict) -> str:
    if not card:
        return "<section id='model-card'><h2>Model card</h2><p>The report records no model card.</p></section>\n"
    training = card.get("training") or {}
    calibration = card.get("calibration") or {}
    open_set = card.get("open_set") or {}
    rows = [
        ("classes", ", ".join(card.get("classes", []))),
        ("input, network", f"{card.get('input', '')} in {card.get('space', '')}, {card.get('arch', '')}"),
        ("trained on", training.get("artifacts_file", "")),
        (
            "training / validation images",
            f"{training.get('train_size', '—')} / {training.get('val_size', '—')}"
            f" (augmented copies: {training.get('augmented_copies', 0)}; augment: "
            f"{', '.join(training.get('augment') or []) or 'none'})",
        ),
        ("validation accuracy", f"{_figure(training.get('val_accuracy'))} (best epoch {training.get('best_epoch')})"),
        (
            "calibration",
            f"temperature {_figure(calibration.get('temperature'))}; ECE {_figure(calibration.get('ece_before'))} → "
            f"{_figure(calibration.get('ece'))}; Brier {_figure(calibration.get('brier_before'))} → "
            f"{_figure(calibration.get('brier'))}; {calibration.get('fitted_on', '')}",
        ),
        (
            "open set",
            f"score {open_set.get('score', '')}, threshold {_figure(open_set.get('threshold'))} at target "
            f"false-alarm rate {_figure(open_set.get('target_fpr'))}"
            + (
                f" ({_figure(open_set['false_alarm_bound'])} for new images)"
                if open_set.get("false_alarm_bound") is not None
                else ""
            ),
        ),
        *_unknown_shares(card, open_set),
        ("has a real class", "yes" if card.get("has_real_class") else "no: a real photo can at best be unknown"),
        ("exported (UTC)", card.get("exported_utc", "")),
    ]
    if card.get("auto"):
        rows.append(("input chosen by --space auto", card["auto"].get("chosen", "")))
    for enrolment in card.get("enrolments") or []:
        rows.append(("enrolled", json.dumps(enrolment, ensure_ascii=False)))
    return "<section id='model-card'><h2>Model card</h2>" + _table(rows) + "</section>\n"


def _limitations(header: dict) -> str:
    classes = header.get("classes", [])
    rule = header.get("verdict_rule") or {}
    search = header.get("search") or {}
    items = [
        f"The model knows {len(classes)} classes ({_e(', '.join(classes))}). It cannot name a generator it was "
        "not trained on; such an image should come out <b>unknown</b>, but a new generator that resembles a "
        "known one can be attributed to it.",
        "A verdict is evidence about the image's pixels, not about who made or published it. It says which "
        "known source the image most resembles in the model's embedding space, with a calibrated probability; "
        "it is not proof that an image is or is not a photograph.",
        "Calibration and the open-set threshold were fitted on validation images like the training data. "
        "Images processed differently (re-compressed, resized, cropped, filtered, screenshots) can be "
        "misattributed; the notes mark those the tool can detect, and their verdict is <b>inconclusive</b>.",
        "The nearest real image is the nearest in the index of real photographs the model was trained against; "
        "a real photo unlike every indexed photo is far from the manifold and may be flagged as off-manifold.",
        "Digests prove that the model, the index and the suspect files are the ones recorded here; they "
        "cannot prove that the training data were what its operator says.",
    ]
    if not rule.get("has_real_class", True):
        items.append("This model has no <b>real</b> class: a real photograph can at best come out unknown.")
    if search and not search.get("exact", True):
        items.append(
            "The nearest-neighbour search was APPROXIMATE: a suspect's nearest real image may not be the true "
            "nearest, which changes its artifact."
        )
    body = "".join(f"<li>{item}</li>" for item in items)
    return f"<section id='limitations'><h2>Limitations: what this report can and cannot conclude</h2><ul>{body}</ul></section>\n"


_SUSPECTS_SECTION = """<section id='suspects'><h2>Suspects</h2>
<div class='controls'>
<label>Filter <input id='filter' type='search' placeholder='file name, source, note…'></label>
<label>Verdict <select id='verdict'><option value=''>all</option></select></label>
<label>Rows per page <select id='page-size'><option>25</option><option selected>100</option><option>500</option>
<option value='0'>all</option></select></label>
<span id='pager'><button id='prev' type='button'>◀</button> <span id='page-info'></span>
<button id='next' type='button'>▶</button></span>
</div>
<noscript><p class='warn'>The suspect table needs JavaScript. The same rows are in the CSV or JSON report.</p></noscript>
<p class='small'>Click a column to sort, a row to show its evidence: the suspect as the model saw it, its nearest
real image, the artifact (their difference in the model's space) and the suspect's spectrum.</p>
<table id='rows'><thead><tr>
<th data-key='index'>#</th><th>image</th><th data-key='path'>file</th><th data-key='verdict'>verdict</th>
<th data-key='predicted'>predicted</th><th data-key='probability'>prob.</th>
<th data-key='manifold_distance'>distance to real</th><th data-key='notes'>notes / status</th>
</tr></thead><tbody></tbody></table>
</section>
"""

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1200px;padding:0 16px;color:#111}
h1{font-size:22px;margin:16px 0 4px}h2{font-size:18px;border-bottom:1px solid #ccc;margin-top:28px}
h3{font-size:15px;margin:8px 0}.small{font-size:12px;color:#444}.lead{font-size:15px}.warn{color:#a40}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
table.kv th{background:#f5f5f5;font-weight:600;white-space:nowrap}table.kv td{word-break:break-all}
.cols{display:flex;gap:24px;flex-wrap:wrap}.controls{display:flex;gap:16px;flex-wrap:wrap;align-items:center;margin:8px 0}
#rows{width:100%}#rows th[data-key]{cursor:pointer;background:#f0f0f0}#rows th.sorted-asc::after{content:' ▲'}
#rows th.sorted-desc::after{content:' ▼'}#rows td.file{word-break:break-all;max-width:420px}
#rows tr.row:hover{background:#f7f9ff;cursor:pointer}#rows tr.error td{color:#a00}#rows tr.skipped td{color:#777}
img.px{image-rendering:pixelated;border:1px solid #999;background:#fff}img.thumb{width:48px;height:48px}
.evidence{display:flex;gap:14px;flex-wrap:wrap}.evidence figure{margin:0;max-width:200px}
.evidence img{width:160px;height:160px}.evidence figcaption{font-size:12px;color:#333}
.bar{display:flex;align-items:center;gap:6px;font-size:12px}.bar span.fill{display:inline-block;height:10px;background:#369}
.verdict{font-weight:700}.v-unknown,.v-inconclusive{color:#a60}
@media print{.controls,#pager,noscript{display:none}#rows tr.row{break-inside:avoid}body{max-width:none}}
"""

# Builds the suspect table from the JSON block. Data reach the page through textContent and
# setAttribute only, never innerHTML, so no file name can become markup.
_SCRIPT = r"""
(function () {
  'use strict';
  var rows = JSON.parse(document.getElementById('manifpt-rows').textContent);
  var shared = JSON.parse(document.getElementById('manifpt-shared-pictures').textContent);
  rows.forEach(function (r, i) {
    r.index = i + 1;
    r.notesText = r.status === 'ok' ? (r.notes.join('; ') || 'ok') : r.status + ': ' + r.error;
  });
  var state = {key: 'index', dir: 1, page: 0, size: 100, text: '', verdict: '', open: {}};
  // '#all' shows every row on one page, '#details' opens each drawn row's evidence (for printing and tests).
  var flags = location.hash.slice(1).split(',');
  if (flags.indexOf('all') >= 0) { state.size = 0; document.getElementById('page-size').value = '0'; }
  var body = document.querySelector('#rows tbody');
  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    if (attrs) { Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); }); }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }
  function picture(r, name, cls) {
    var png = r.evidence && (name === 'nearest' ? shared[r.evidence.nearest_picture] : r.evidence.png[name]);
    return png ? el('img', {src: 'data:image/png;base64,' + png, 'class': 'px ' + cls, alt: name}) : null;
  }
  var verdicts = {};
  rows.forEach(function (r) { verdicts[r.status === 'ok' ? r.verdict : r.status] = true; });
  var select = document.getElementById('verdict');
  Object.keys(verdicts).sort().forEach(function (v) { select.appendChild(el('option', {value: v}, v)); });
  function matches(r) {
    if (state.verdict && (r.status === 'ok' ? r.verdict : r.status) !== state.verdict) { return false; }
    if (!state.text) { return true; }
    var hay = [r.path, r.verdict, r.predicted, r.notesText, r.sha256].join(' ').toLowerCase();
    return hay.indexOf(state.text) >= 0;
  }
  function compare(a, b) {
    var x = a[state.key], y = b[state.key];
    if (state.key === 'notes') { x = a.notesText; y = b.notesText; }
    if (x === null || x === undefined || x === '') { return 1; }
    if (y === null || y === undefined || y === '') { return -1; }
    if (typeof x === 'number' && typeof y === 'number') { return (x - y) * state.dir || a.index - b.index; }
    return String(x).localeCompare(String(y)) * state.dir || a.index - b.index;
  }
  function detail(r) {
    var cell = el('td', {colspan: '8'});
    if (r.status !== 'ok') { cell.appendChild(el('p', null, r.status + ': ' + r.error)); }
    var box = el('div', {'class': 'evidence'});
    var caption = {suspect: 'suspect, as attributed (' + r.width + '×' + r.height + ' file)',
      nearest: 'nearest real image: ' + r.nearest_real, artifact: 'artifact: ' + (r.evidence ? r.evidence.artifact_caption : ''),
      spectrum: "suspect's log-magnitude spectrum (centred)"};
    ['suspect', 'nearest', 'artifact', 'spectrum'].forEach(function (name) {
      var img = picture(r, name, '');
      var missing = r.evidence && r.evidence.missing[name];
      if (!img && !missing) { return; }
      var fig = el('figure');
      if (img) { fig.appendChild(img); }
      fig.appendChild(el('figcaption', null, img ? caption[name] : name + ' not shown: ' + missing));
      box.appendChild(fig);
    });
    if (r.status === 'ok') {
      var facts = el('div');
      facts.appendChild(el('div', {'class': 'verdict v-' + r.verdict}, 'verdict: ' + r.verdict));
      r.top_k.forEach(function (k) {
        var bar = el('div', {'class': 'bar'});
        bar.appendChild(el('span', {'class': 'label'}, k.label));
        bar.appendChild(el('span', {'class': 'fill', style: 'width:' + Math.round(k.probability * 160) + 'px'}));
        bar.appendChild(el('span', null, k.probability.toFixed(3)));
        facts.appendChild(bar);
      });
      facts.appendChild(el('div', null, 'distance to nearest real: ' + r.manifold_distance));
      facts.appendChild(el('div', null, 'open-set score: ' + r.open_set_score));
      facts.appendChild(el('div', null, 'notes: ' + (r.notes.join('; ') || 'none')));
      box.appendChild(facts);
    }
    cell.appendChild(box);
    cell.appendChild(el('p', {'class': 'small'}, 'SHA-256 ' + (r.sha256 || '(not read)')));
    var tr = el('tr', {'class': 'detail'});
    tr.appendChild(cell);
    return tr;
  }
  function draw() {
    var shown = rows.filter(matches).sort(compare);
    var size = state.size || shown.length || 1;
    var pages = Math.max(1, Math.ceil(shown.length / size));
    state.page = Math.min(state.page, pages - 1);
    var slice = shown.slice(state.page * size, state.page * size + size);
    body.textContent = '';
    slice.forEach(function (r) {
      var tr = el('tr', {'class': 'row ' + r.status, 'data-row': String(r.index)});
      tr.appendChild(el('td', null, r.index));
      var thumb = el('td');
      var img = picture(r, 'suspect', 'thumb');
      if (img) { thumb.appendChild(img); }
      tr.appendChild(thumb);
      tr.appendChild(el('td', {'class': 'file'}, r.path));
      tr.appendChild(el('td', {'class': 'verdict v-' + r.verdict}, r.verdict));
      tr.appendChild(el('td', null, r.predicted));
      tr.appendChild(el('td', null, r.probability === null ? '' : r.probability.toFixed(3)));
      tr.appendChild(el('td', null, r.manifold_distance === null ? '' : Number(r.manifold_distance).toPrecision(5)));
      tr.appendChild(el('td', null, r.notesText));
      tr.addEventListener('click', function () { state.open[r.index] = !state.open[r.index]; draw(); });
      body.appendChild(tr);
      if (state.open[r.index] || flags.indexOf('details') >= 0) { body.appendChild(detail(r)); }
    });
    document.getElementById('page-info').textContent =
      'page ' + (state.page + 1) + ' of ' + pages + ' (' + shown.length + ' of ' + rows.length + ' files)';
    document.querySelectorAll('#rows th[data-key]').forEach(function (th) {
      th.className = th.getAttribute('data-key') === state.key ? (state.dir > 0 ? 'sorted-asc' : 'sorted-desc') : '';
    });
    document.body.setAttribute('data-rows-drawn', String(slice.length));
  }
  document.querySelectorAll('#rows th[data-key]').forEach(function (th) {
    th.addEventListener('click', function () {
      var key = th.getAttribute('data-key');
      state.dir = state.key === key ? -state.dir : 1; state.key = key; state.page = 0; draw();
    });
  });
  document.getElementById('filter').addEventListener('input', function (e) {
    state.text = e.target.value.toLowerCase(); state.page = 0; draw();
  });
  select.addEventListener('change', function (e) { state.verdict = e.target.value; state.page = 0; draw(); });
  document.getElementById('page-size').addEventListener('change', function (e) {
    state.size = Number(e.target.value); state.page = 0; draw();
  });
  document.getElementById('prev').addEventListener('click', function () { state.page = Math.max(0, state.page - 1); draw(); });
  document.getElementById('next').addEventListener('click', function () { state.page += 1; draw(); });
  window.addEventListener('beforeprint', function () { rows.forEach(function (r) { state.open[r.index] = true; }); draw(); });
  var started = performance.now();
  draw();
  document.body.setAttribute('data-render-ms', String(Math.round(performance.now() - started)));
  document.body.setAttribute('data-open-ms', String(Math.round(performance.now())));  // since navigation began
  document.body.setAttribute('data-rows-total', String(rows.length));
})();
"""
