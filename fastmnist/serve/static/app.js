// The draw-a-digit page: pointer strokes on a canvas, sent as a PNG to api/predict while the user draws.
"use strict";

// A digit drawn to fill most of the 280-unit canvas is about 200 units tall; preprocessing scales it to
// MNIST's 20-pixel box, so a 20-unit stroke becomes the 2-pixel-wide ink of MNIST's digits.
const STROKE_WIDTH = 20;
const DEBOUNCE_MS = 120;  // a prediction at most this long after the last change
const MAX_UPLOAD_BYTES = 8 << 20;  // the server's body limit: refuse here instead of sending it

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const digitOut = document.getElementById("digit");
const confidence = document.getElementById("confidence");
const bars = document.getElementById("bars");
const seen = document.getElementById("seen");
const seenEmpty = document.getElementById("seen-empty");
const statusLine = document.getElementById("status");
const fileInput = document.getElementById("file");

let strokes = [];          // each stroke: [[x, y], ...] in canvas units
let current = null;        // the stroke under the pointer
let pen = null;            // that pointer's id: a second finger on the canvas is ignored
let background = null;     // an uploaded image shown on the canvas (an ImageBitmap)
let version = 0;           // bumped on every change; an answer for an older version is stale
let timer = null;          // the debounce timer
let inFlight = false;      // never more than one request at a time
let pending = false;       // a change arrived while a request was in flight
let queuedUpload = null;   // an upload chosen while a request was in flight

// The 10 probability bars.
const rows = [];
for (let d = 0; d < 10; d++) {
  const li = document.createElement("li");
  li.innerHTML = `<span class="label">${d}</span><span class="track"><span class="fill"></span></span><span class="pct"></span>`;
  bars.appendChild(li);
  rows.push(li);
}

function setBusy() {
  document.body.dataset.state = inFlight || timer !== null || pending || queuedUpload ? "busy" : "idle";
}

function paint() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, pad.width, pad.height);
  if (background) {
    const s = Math.min(pad.width / background.width, pad.height / background.height);
    const w = background.width * s, h = background.height * s;
    ctx.drawImage(background, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
  }
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = STROKE_WIDTH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  for (const stroke of strokes) {
    ctx.beginPath();
    ctx.moveTo(stroke[0][0], stroke[0][1]);
    for (const [x, y] of stroke) ctx.lineTo(x, y);  // one point: a round dot
    ctx.stroke();
  }
}

function canvasPoint(e) {
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}

function segment(a, b) {
  ctx.beginPath();
  ctx.moveTo(a[0], a[1]);
  ctx.lineTo(b[0], b[1]);
  ctx.stroke();
}

pad.addEventListener("pointerdown", (e) => {
  if (current || (e.pointerType === "mouse" && e.button !== 0)) return;
  e.preventDefault();
  pen = e.pointerId;
  pad.focus();
  pad.setPointerCapture(e.pointerId);
  if (background) {  // drawing starts anew over an uploaded image
    background = null;
    paint();
  }
  const p = canvasPoint(e);
  current = [p];
  strokes.push(current);
  segment(p, p);
  changed();
});

pad.addEventListener("pointermove", (e) => {
  if (!current || e.pointerId !== pen) return;
  const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [e];
  for (const ev of events.length ? events : [e]) {
    const p = canvasPoint(ev);
    segment(current[current.length - 1], p);
    current.push(p);
  }
  changed();
});

function endStroke(e) {
  if (!current || e.pointerId !== pen) return;
  current = null;
  changed();
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

function undo() {
  if (current || !strokes.length) return;
  strokes.pop();
  paint();
  strokes.length ? changed() : clear();
}

function clear() {
  strokes = [];
  current = null;
  background = null;
  version++;
  clearTimeout(timer);
  timer = null;
  pending = false;
  queuedUpload = null;
  paint();
  showNothing();
  setBusy();
}

document.getElementById("undo").addEventListener("click", undo);
document.getElementById("clear").addEventListener("click", clear);
document.addEventListener("keydown", (e) => {
  if ((e.ctrlKey || e.metaKey) && !e.shiftKey && e.key.toLowerCase() === "z") {
    e.preventDefault();
    undo();
  } else if (e.key === "Escape") {
    clear();
  }
});

// Live prediction: debounced, and never more than one request in flight.
function changed() {
  version++;
  clearTimeout(timer);
  timer = setTimeout(() => { timer = null; predictDrawing(); }, DEBOUNCE_MS);
  setBusy();
}

function predictDrawing() {
  if (inFlight) {
    pending = true;
    setBusy();
    return;
  }
  if (!strokes.length) {
    setBusy();
    return;
  }
  const asked = version, count = strokes.length;
  pad.toBlob((blob) => send(blob, "image/png", asked, count, null), "image/png");
  inFlight = true;
  setBusy();
}

async function send(body, type, asked, count, label) {
  inFlight = true;
  setBusy();
  try {
    const init = { method: "POST", body };
    if (type) init.headers = { "Content-Type": type };
    const response = await fetch("api/predict", init);
    const answer = await response.json();
    if (asked !== version) {
      // The drawing changed while this request was out: its answer is stale.
    } else if (!response.ok) {
      showNothing();
      showStatus(answer.error || `the server answered ${response.status}`, true);
    } else {
      show(answer, count, label);
    }
  } catch (err) {
    if (asked === version) showStatus("the server is not answering; is `fastmnist serve` still running?", true);
  } finally {
    inFlight = false;
    if (queuedUpload) {
      const [form, name] = [queuedUpload.form, queuedUpload.name];
      queuedUpload = null;
      send(form, null, version, 0, name);
    } else if (pending) {
      pending = false;
      predictDrawing();
    }
    setBusy();
  }
}

function show(answer, count, label) {
  const p = answer.probabilities;
  digitOut.textContent = String(answer.digit);
  digitOut.dataset.strokes = String(count);
  digitOut.dataset.source = label || "drawing";
  confidence.textContent = `p = ${p[answer.digit].toFixed(3)}`;
  rows.forEach((li, d) => {
    li.querySelector(".fill").style.width = `${(100 * p[d]).toFixed(1)}%`;
    li.querySelector(".pct").textContent = `${(100 * p[d]).toFixed(1)}%`;
    li.classList.toggle("winner", d === answer.digit);
    li.setAttribute("aria-label", `${d}: ${(100 * p[d]).toFixed(1)} percent`);
  });
  seen.src = `data:image/png;base64,${answer.input_png}`;
  seen.alt = `the 28 by 28 image the model saw, read as ${answer.digit}`;
  seen.hidden = false;
  seenEmpty.hidden = true;
  showStatus(`${label ? label + ": " : ""}read in ${answer.milliseconds.toFixed(1)} ms on the server`, false);
}

function showNothing() {
  digitOut.textContent = "–";
  digitOut.dataset.strokes = "0";
  digitOut.dataset.source = "";
  confidence.textContent = "";
  rows.forEach((li, d) => {
    li.querySelector(".fill").style.width = "0";
    li.querySelector(".pct").textContent = "";
    li.classList.remove("winner");
    li.setAttribute("aria-label", `${d}: no prediction`);
  });
  seen.hidden = true;
  seen.removeAttribute("src");
  seenEmpty.hidden = false;
  showStatus("", false);
}

function showStatus(text, isError) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

// Upload, from the file picker or dropped on the canvas: the file's own bytes go to the server,
// which reads them as `fastmnist predict` reads a file.
function upload(file) {
  clear();
  if (file.size > MAX_UPLOAD_BYTES) {
    showStatus(`${file.name}: ${file.size.toLocaleString()} bytes, over the ${MAX_UPLOAD_BYTES >> 20} MiB limit`, true);
    return;
  }
  createImageBitmap(file).then((bitmap) => { background = bitmap; paint(); }, () => {});  // a preview only
  const form = new FormData();
  form.append("file", file, file.name);
  if (inFlight) queuedUpload = { form, name: file.name };
  else send(form, null, version, 0, file.name);
}

document.getElementById("upload").addEventListener("click", () => fileInput.click());
fileInput.addEventListener("change", () => {
  if (fileInput.files.length) upload(fileInput.files[0]);
  fileInput.value = "";  // the same file chosen again is a new upload
});
pad.addEventListener("dragover", (e) => { e.preventDefault(); pad.classList.add("dragging"); });
pad.addEventListener("dragleave", () => pad.classList.remove("dragging"));
pad.addEventListener("drop", (e) => {
  e.preventDefault();
  pad.classList.remove("dragging");
  if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
});

// The model's card: GET api/model, shown with these labels in this order.
const CARD_FIELDS = [
  ["model", "Model", String],
  ["parameters", "Parameters", (n) => n.toLocaleString("en")],
  ["test_accuracy", "Test accuracy", (a) => `${(100 * a).toFixed(2)}%`],
  ["kernel_path", "Kernel path", String],
  ["path", "File", (p) => p.split(/[\\/]/).slice(-2).join("/")],  // the run folder and file, not the whole path
];

async function loadCard() {
  const dl = document.getElementById("model");
  try {
    const response = await fetch("api/model");
    const card = await response.json();
    dl.replaceChildren();
    for (const [key, name, format] of CARD_FIELDS) {
      if (card[key] === undefined) continue;
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = name;
      dd.textContent = card[key] === null ? "unknown" : format(card[key]);
      dl.append(dt, dd);
    }
  } catch (err) {
    dl.replaceChildren(Object.assign(document.createElement("dt"), { textContent: "the model's card did not load" }));
  }
}

paint();
showNothing();
loadCard();
