// The annotator's review loop against the app's own REST API (no build step, no dependencies):
//   GET  /info/                                   class names, the model, its validation accuracy (train_stats),
//                                                 the intended use (shown at the foot of the page)
//   GET  /review/whoami                           who is signed in and what the role allows (absent: all allowed)
//   POST /activelearning/most_suspicious          next image (409 with what to do when there is none)
//   GET  /datastore/label?label=<id>&tag=final    its current label file (the patient group is kept on save)
//   GET  /datastore/label/info?label=<id>&tag=final   unsure and note saved with it
//   GET  /datastore/image/info?image=<id>         its review score, and the model's prediction when scoring stored it
//   GET  /review/image?image=<id>                 the image as PNG, at its source resolution
//   GET  /review/history?image=<id>&tag=final     every save of its label (who, when, old -> new)
//   POST /infer/<model>?image=<id>&output=json    the model's probabilities, when scoring did not store them, and
//                                                 whether the image is assessable (abstention score vs threshold)
//   PUT  /datastore/label?image=<id>&tag=final    save the label with unsure and note (the server adds who)
//   POST /train/<model>, POST /scoring/<method>   start training or scoring; GET /train/, /scoring/ their status
// Every request that changes something carries X-Requested-With, which a cross-origin page cannot send
// without the server's consent. After each image is shown, document.body.dataset holds imageId and
// shownMs (time from the request for the image to the image and probabilities on screen), read by the
// browser test.
"use strict";

const ROOT = new URL("../", window.location.href);  // the page is served at <server>/review/
const TOKEN_KEY = "robustmri-review-token";
const CHANGE_HEADERS = { "X-Requested-With": "robustmri-review" };
const SCORING = "influence_review";
const TAG = "final";
const POLL_MS = 2000;
const AUTH_HELP = {
  "no token": "The server asks for a sign-in: paste your access token below.",
  "token rejected": "The server rejected this token (wrong signature, audience or issuer): get a new token from " +
    "your sign-in page and paste it below.",
  "token expired": "Your token has expired: sign in again and paste the new token below.",
};
const state = {
  classes: [], model: null, can: { train: true, score: true, label: true }, busy: false,
  sample: null, label: null, group: null, saved: { unsure: false, note: "" }, explanation: "",
  trail: [], backIndex: null,  // this session's saves (oldest first), and which of them is shown after "back"
  view: { zoom: 1, fit: true, window: 255, level: 127.5 }, gray: null, width: 0, height: 0,
};
const $ = (id) => document.getElementById(id);

class ApiError extends Error {}

function headers(method) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const auth = token ? { Authorization: "Bearer " + token } : {};
  return method === "GET" || method === "HEAD" ? auth : { ...auth, ...CHANGE_HEADERS };
}

async function detail(response) {
  const text = await response.text();
  try {
    const parsed = JSON.parse(text);
    return parsed.detail !== undefined ? parsed.detail : parsed;
  } catch (err) {
    return text;
  }
}

async function api(method, path, body) {
  const response = await fetch(new URL(path, ROOT), { method, headers: headers(method), body });
  if (response.status === 401) {
    const reason = await detail(response);
    const help = AUTH_HELP[reason] || "The server answered 401 (" + JSON.stringify(reason) + "): paste a valid " +
      "access token below.";
    $("auth-help").textContent = help;
    $("auth-help").dataset.reason = typeof reason === "string" ? reason : "";
    $("token-form").hidden = false;
    throw new ApiError(help);
  }
  if (response.status === 403) {
    throw new ApiError("not allowed (" + method + " /" + path.split("?")[0] + "): " +
      JSON.stringify(await detail(response)));
  }
  return response;
}

function showMessage(text, isError) {
  const box = $("message");
  box.textContent = text;
  box.className = isError ? "error" : "";
  box.hidden = false;
}

function percent(p) {
  return (100 * p).toFixed(1) + " %";
}

function showProgress(progress) {
  for (const key of ["reviewed", "pending", "corrected"]) {
    $(key).textContent = progress && progress[key] !== undefined ? progress[key] : "–";
  }
}

function setBusy(busy) {
  state.busy = busy;
  for (const button of document.querySelectorAll("#buttons button, #nav button")) button.disabled = busy;
}

function showAccuracy(info) {
  const stats = ((info.train_stats || {})[state.model]) || {};
  const accuracy = stats.best_val_accuracy;
  $("accuracy").textContent = typeof accuracy === "number"
    ? "model: validation accuracy " + percent(accuracy) + (stats.best_epoch !== undefined ? " (epoch " + stats.best_epoch + ")" : "")
      + (stats.n_val !== undefined ? " on " + stats.n_val + " images" : "")
    : "model: not trained here yet (no validation accuracy)";
}

function buildButtons() {
  const buttons = $("buttons");
  buttons.textContent = "";
  state.classes.forEach((name, k) => {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.label = name;
    button.textContent = (k + 1) + " " + name;
    button.addEventListener("click", () => save(name));
    buttons.appendChild(button);
  });
  const keep = document.createElement("button");
  keep.type = "button";
  keep.id = "keep";
  keep.textContent = "K keep";
  keep.addEventListener("click", () => save(state.label));
  buttons.appendChild(keep);
  const keys = state.classes.map((name, k) => [String(k + 1), name]).concat([
    ["K", "keep"], ["Enter", "keep"], ["U", "unsure"], ["Z", "undo"], ["⌫", "undo"], ["B", "back"], ["←", "back"],
    ["N", "next in queue"], ["+", "zoom in"], ["−", "zoom out"], ["F", "fit"], ["R", "reset window/level"]]);
  const help = $("key-help");
  help.textContent = "Keys: ";
  keys.forEach(([key, what], k) => {
    const kbd = document.createElement("kbd");
    kbd.textContent = key;
    help.append(kbd, " " + what + (k + 1 < keys.length ? ", " : ""));
  });
}

async function loadWhoami() {
  const response = await api("GET", "review/whoami");
  const who = response.ok ? await response.json() : null;  // absent (404): authentication off, all allowed
  state.can = who && who.can ? who.can : { train: true, score: true, label: true };
  $("whoami").textContent = who && who.username ? "signed in as " + who.username +
    (who.roles && who.roles.length ? " (" + who.roles.join(", ") + ")" : "") : "";
  $("train").hidden = !(state.can.train && state.model);
  $("score").hidden = !state.can.score;
  for (const id of ["buttons", "extra", "nav"]) $(id).hidden = state.can.label === false;
}

async function loadInfo() {
  const response = await api("GET", "info/");
  if (!response.ok) throw new ApiError("GET /info/: HTTP " + response.status);
  const info = await response.json();
  state.classes = info.labels || [];
  state.model = Object.keys(info.models || {})[0] || null;
  $("intended-use").textContent = info.intended_use ? "Intended use: " + info.intended_use : "";
  showAccuracy(info);
}

async function init() {
  try {
    await loadInfo();
    await loadWhoami();
    buildButtons();
    await next();
  } catch (err) {
    showMessage(String(err.message || err), true);
  }
}

// The most suspicious image not yet reviewed, from the server's review order.
async function next() {
  const started = performance.now();
  setBusy(true);
  try {
    const response = await api("POST", "activelearning/most_suspicious");
    if (response.status === 409) {  // nothing to review: the server says what to do instead
      const body = await detail(response);
      $("review").hidden = true;
      showProgress(body.progress);
      showMessage((body.message || JSON.stringify(body)) +
        (state.can.score ? " (the Score labels button above starts scoring)" : ""), false);
      return;
    }
    if (!response.ok) throw new ApiError("next image: HTTP " + response.status + " " + JSON.stringify(await detail(response)));
    const sample = await response.json();
    state.explanation = sample.explanation || "";
    state.order = sample.order ? { name: sample.order, reason: sample.order_reason || "" } : null;
    showProgress(sample);
    state.backIndex = null;
    await show(sample.id, started);
  } catch (err) {
    showMessage(String(err.message || err), true);
  } finally {
    setBusy(false);
  }
}

function getJson(path, fallback) {
  return api("GET", path).then((r) => r.ok ? r.json() : fallback);
}

// Show image ``id``: its label, unsure and note, its score, the model's prediction, the image and its history.
async function show(id, started) {
  const query = "?image=" + encodeURIComponent(id);
  const labelQuery = "?label=" + encodeURIComponent(id) + "&tag=" + TAG;
  const [labelFile, labelInfo, imageInfo, image, history] = await Promise.all([
    getJson("datastore/label" + labelQuery, null),
    getJson("datastore/label/info" + labelQuery, {}),
    getJson("datastore/image/info" + query, {}),
    api("GET", "review/image" + query).then(async (r) => r.ok ? r.blob() : Promise.reject(
      new ApiError("image " + id + ": " + JSON.stringify(await detail(r))))),
    getJson("review/history" + query + "&tag=" + TAG, { history: [] }),
  ]);
  const review = imageInfo.influence_review || {};
  let prediction;
  if (review.probabilities) {  // stored by scoring with the model that ranked it: no second inference
    prediction = { probabilities: review.probabilities };
  } else if (state.model) {
    const r = await api("POST", "infer/" + encodeURIComponent(state.model) + query + "&output=json");
    prediction = r.ok ? await r.json() : { error: "HTTP " + r.status + " " + JSON.stringify(await detail(r)) };
  } else {
    prediction = { error: "no trained model: train first" };
  }
  let label = labelFile && labelFile.label !== undefined ? labelFile.label : review.label;
  if (typeof label === "number") label = state.classes[label];
  state.sample = { id, ...review };
  state.label = label;
  state.group = labelFile && labelFile.group !== undefined ? labelFile.group : null;
  state.saved = { unsure: labelInfo.unsure === true, note: typeof labelInfo.note === "string" ? labelInfo.note : "" };
  await render(prediction, history.history || [], image);
  if (prediction.assessable === undefined && review.probabilities && state.model) {
    // stored probabilities carry no abstention score: ask the model, after the image is on screen
    api("POST", "infer/" + encodeURIComponent(state.model) + query + "&output=json")
      .then((r) => r.ok ? r.json() : null)
      .then((inferred) => { if (inferred && document.body.dataset.imageId === id) showAssessable(inferred); })
      .catch(() => {});
  }
  if (started !== undefined) {
    const shownMs = performance.now() - started;
    document.body.dataset.shownMs = shownMs.toFixed(0);
    $("status").textContent = "shown in " + shownMs.toFixed(0) + " ms";
  }
  document.body.dataset.imageId = id;
}

function predictedClass(prediction) {
  if (prediction.error || !prediction.probabilities || prediction.assessable === false) return null;
  return state.classes.reduce((best, name) =>
    best === null || prediction.probabilities[name] > prediction.probabilities[best] ? name : best, null);
}

function showDisagreement(prediction) {
  const banner = $("disagreement");
  const predicted = predictedClass(prediction);
  banner.textContent = "";
  if (predicted === null) {
    banner.className = "unknown";
    banner.textContent = "Label " + state.label + "; model: " + (prediction.error ||
      (prediction.assessable === false ? "not assessable, no class (its probabilities below)" : "no prediction"));
    return;
  }
  const p = percent(prediction.probabilities[predicted]);
  const strong = (text) => Object.assign(document.createElement("b"), { textContent: text });
  if (predicted === state.label) {
    banner.className = "agree";
    banner.append("Label ", strong(state.label), ", model agrees ", strong(p));
  } else {
    banner.className = "disagree";
    banner.append("Label ", strong(state.label), ", model says ", strong(predicted + " " + p));
  }
  banner.dataset.predicted = predicted;
}

// Whether the model can vouch for this image: its abstention score against the checkpoint's threshold.
function showAssessable(prediction) {
  const line = $("assessable");
  const rule = prediction.abstention || {};
  line.className = "";
  line.title = "";
  if (rule.error) {
    line.textContent = "Assessable: not judged (" + rule.error + ")";
    return;
  }
  if (prediction.assessable === undefined || prediction.abstention_score === undefined) {
    line.textContent = prediction.error ? "" : "Assessable: checking with the model…";
    return;
  }
  const score = Number(prediction.abstention_score).toFixed(1);
  const threshold = rule.threshold === undefined ? "?" : Number(rule.threshold).toFixed(1);
  if (prediction.assessable) {
    line.className = "assessable";
    line.textContent = "Assessable: abstention score " + score + " ≤ threshold " + threshold;
  } else {
    line.className = "not-assessable";
    line.textContent = "Not assessable: abstention score " + score + " > threshold " + threshold +
      "; the image is unlike the training images and the model gives no class";
  }
  const where = rule.calibrated_on || {};
  line.title = (rule.score || "") + " score; threshold calibrated on " + (where.kind || "?") + " (" +
    (where.n === undefined ? "?" : where.n) + " images, " + (where.date || "?") + ")";
}

function showHistory(lines) {
  const list = $("history");
  list.textContent = "";
  if (!lines.length) {
    list.appendChild(Object.assign(document.createElement("li"), { textContent: "no save through this server yet" }));
    return;
  }
  for (const line of lines.slice().reverse()) {  // newest first
    const item = document.createElement("li");
    if (line.action === "undo") item.className = "undo";
    const when = String(line.ts || "").replace("T", " ").replace("+00:00", " UTC");
    item.textContent = when + " · " + line.annotator + ": " + (line.action === "undo" ? "undo, " : "") +
      (line.old === null ? "(none)" : line.old) + " → " + line.new + (line.unsure ? " · unsure" : "") +
      (line.note ? " · “" + line.note + "”" : "");
    list.appendChild(item);
  }
}

function render(prediction, history, imageBlob) {
  $("message").hidden = true;
  $("review").hidden = false;
  const s = state.sample;
  $("image-id").textContent = s.id + (state.backIndex !== null ? " (back: reviewed earlier in this session)" : "");
  $("suspicion").textContent = s.rank !== undefined
    ? "Suspicion: rank " + s.rank + " of " + s.of + " (in the most suspicious " + s.percentile + " %)" : "";
  $("explanation").textContent = state.explanation;
  // which order serves the images, and the measured reason, so the annotator knows what "rank" means
  $("order").textContent = state.order ? "Order: " + state.order.name.replace(/_/g, " ") + "." : "";
  $("order").title = state.order ? state.order.reason : "";
  $("order-reason").textContent = state.order ? state.order.reason : "";
  $("current-label").textContent = state.label;
  $("label-flags").textContent = (state.saved.unsure ? "marked unsure" : "") +
    (state.saved.note ? (state.saved.unsure ? " · " : "") + "note: " + state.saved.note : "");
  $("unsure").checked = state.saved.unsure;
  $("note").value = state.saved.note;
  $("queue").hidden = state.backIndex === null;
  showDisagreement(prediction);
  showAssessable(prediction);
  const predicted = predictedClass(prediction);
  const rows = $("probabilities").querySelector("tbody");
  rows.textContent = "";
  if (prediction.error) {
    rows.insertRow().insertCell().textContent = "model: " + prediction.error;
  } else {
    for (const name of state.classes) {
      const p = prediction.probabilities[name];
      const row = rows.insertRow();
      row.dataset.label = name;
      row.classList.toggle("current", name === state.label);
      row.classList.toggle("predicted", name === predicted);
      row.insertCell().textContent = name;
      const bar = row.insertCell();
      bar.className = "bar";
      const fill = document.createElement("div");
      fill.style.width = (100 * p).toFixed(1) + "%";
      bar.appendChild(fill);
      row.insertCell().textContent = percent(p);
    }
  }
  for (const button of $("buttons").querySelectorAll("button[data-label]")) {
    button.classList.toggle("current", button.dataset.label === state.label);
    button.classList.toggle("predicted", button.dataset.label === predicted && predicted !== state.label);
  }
  showHistory(history);
  return loadPixels(imageBlob);
}

// ---- the image: source pixels, window/level and zoom on a canvas ----

async function loadPixels(blob) {
  const bitmap = await createImageBitmap(blob);
  const canvas = $("image");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  const rgba = context.getImageData(0, 0, bitmap.width, bitmap.height).data;
  state.gray = new Uint8ClampedArray(bitmap.width * bitmap.height);
  for (let i = 0; i < state.gray.length; i++) state.gray[i] = rgba[4 * i];  // the PNG is 8-bit grey
  state.width = bitmap.width;
  state.height = bitmap.height;
  bitmap.close();
  drawWindow();
  applyZoom();
}

function drawWindow() {
  if (!state.gray) return;
  const { window: width, level } = state.view;
  const low = level - width / 2;
  const canvas = $("image");
  const context = canvas.getContext("2d", { willReadFrequently: true });
  const out = context.createImageData(state.width, state.height);
  for (let i = 0; i < state.gray.length; i++) {
    const v = Math.max(0, Math.min(255, ((state.gray[i] - low) * 255) / width));
    out.data[4 * i] = out.data[4 * i + 1] = out.data[4 * i + 2] = v;
    out.data[4 * i + 3] = 255;
  }
  context.putImageData(out, 0, 0);
  $("window").value = width;
  $("level").value = level;
}

function fitZoom() {
  const stage = $("stage");
  return state.width ? Math.min(stage.clientWidth / state.width, stage.clientHeight / state.height) : 1;
}

function applyZoom() {
  if (state.view.fit) state.view.zoom = fitZoom();
  const canvas = $("image");
  canvas.style.width = (state.width * state.view.zoom).toFixed(1) + "px";
  canvas.style.height = (state.height * state.view.zoom).toFixed(1) + "px";
  canvas.classList.toggle("pixelated", state.view.zoom >= 2);
  $("zoom-level").textContent = Math.round(100 * state.view.zoom) + " %" + (state.view.fit ? " (fit)" : "");
  document.body.dataset.zoom = state.view.zoom.toFixed(3);
}

function zoomBy(factor) {
  state.view.zoom = Math.max(0.1, Math.min(32, state.view.zoom * factor));
  state.view.fit = false;
  applyZoom();
}

function setWindow(width, level) {
  state.view.window = Math.max(1, Math.min(255, width));
  state.view.level = Math.max(0, Math.min(255, level));
  drawWindow();
}

$("zoom-in").addEventListener("click", () => zoomBy(1.25));
$("zoom-out").addEventListener("click", () => zoomBy(0.8));
$("zoom-fit").addEventListener("click", () => { state.view.fit = true; applyZoom(); });
$("zoom-1").addEventListener("click", () => { state.view.fit = false; state.view.zoom = 1; applyZoom(); });
$("wl-reset").addEventListener("click", () => setWindow(255, 127.5));
$("window").addEventListener("input", (e) => setWindow(Number(e.target.value), state.view.level));
$("level").addEventListener("input", (e) => setWindow(state.view.window, Number(e.target.value)));
$("stage").addEventListener("wheel", (event) => {
  event.preventDefault();
  zoomBy(Math.pow(1.1, -event.deltaY / 100));
}, { passive: false });
(() => {  // drag on the image: left/right widens or narrows the window, up/down raises or lowers the level
  let drag = null;
  const canvas = $("image");
  canvas.addEventListener("pointerdown", (event) => {
    drag = { x: event.clientX, y: event.clientY, window: state.view.window, level: state.view.level };
    canvas.setPointerCapture(event.pointerId);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (drag) setWindow(drag.window + (event.clientX - drag.x), drag.level - (event.clientY - drag.y));
  });
  const end = () => { drag = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
})();
window.addEventListener("resize", () => { if (state.view.fit) applyZoom(); });

// ---- saving, undo and back ----

async function putLabel(id, content, fields) {
  const form = new FormData();
  form.append("label", new File([JSON.stringify(content)], id + ".label.json", { type: "application/json" }));
  form.append("params", JSON.stringify(fields));
  const response = await api("PUT", "datastore/label?image=" + encodeURIComponent(id) + "&tag=" + TAG, form);
  if (!response.ok) throw new ApiError("label of " + id + " not saved: " + JSON.stringify(await detail(response)));
}

function labelContent(label, group) {
  return group === null ? { label } : { label, group };
}

async function save(label) {
  if (state.busy || !state.sample || !label) return;
  setBusy(true);
  const id = state.sample.id;
  const fields = { unsure: $("unsure").checked, note: $("note").value.trim(), action: "save" };
  try {
    await putLabel(id, labelContent(label, state.group), fields);
    state.trail.push({ id, before: { label: state.label, group: state.group, ...state.saved }, after: label });
    $("status").textContent = id + ": " + (label === state.label ? "kept " : "changed to ") + label +
      (fields.unsure ? " (unsure)" : "");
  } catch (err) {
    showMessage(String(err.message || err), true);
    setBusy(false);
    return;
  }
  await next();
}

// Restore the label as it was before this session's last save (class, unsure, note), and show that image again.
async function undo() {
  if (state.busy) return;
  const last = state.trail[state.trail.length - 1];
  if (!last) {
    $("status").textContent = "nothing to undo: no label saved in this session";
    return;
  }
  setBusy(true);
  try {
    const { label, group, unsure, note } = last.before;
    await putLabel(last.id, labelContent(label, group), { unsure, note, action: "undo" });
    state.trail.pop();
    state.backIndex = state.trail.length;  // shown outside the queue, like "back"
    await show(last.id);
    $("status").textContent = last.id + ": undone, " + last.after + " → " + label;
  } catch (err) {
    showMessage(String(err.message || err), true);
  } finally {
    setBusy(false);
  }
}

// Show the image reviewed before the one on screen (this session's saves, newest first).
async function back() {
  if (state.busy) return;
  const index = (state.backIndex === null ? state.trail.length : state.backIndex) - 1;
  if (index < 0) {
    $("status").textContent = "no earlier image in this session";
    return;
  }
  setBusy(true);
  try {
    state.backIndex = index;
    await show(state.trail[index].id);
    $("status").textContent = "back to " + state.trail[index].id + ": save a class to change it, or go on to the queue";
  } catch (err) {
    showMessage(String(err.message || err), true);
  } finally {
    setBusy(false);
  }
}

$("back").addEventListener("click", back);
$("undo").addEventListener("click", undo);
$("queue").addEventListener("click", () => { if (!state.busy) next(); });

// ---- train and score, with their progress ----

const TASKS = {
  train: { button: "train", what: "training", status: "train/", start: () => "train/" + encodeURIComponent(state.model) },
  score: { button: "score", what: "scoring", status: "scoring/", start: () => "scoring/" + SCORING },
};

function showTask(text, taskState) {
  const status = $("task-status");
  status.textContent = text;
  status.dataset.state = taskState;
}

async function runTask(kind) {
  const task = TASKS[kind];
  $(task.button).disabled = true;
  try {
    const response = await api("POST", task.start());
    if (!response.ok && response.status !== 429) {  // 429: one is already running; follow it
      throw new ApiError(task.what + " not started: HTTP " + response.status + " " + JSON.stringify(await detail(response)));
    }
    showTask(task.what + ": started", "running");
    const done = await pollTask(task);
    // the server asks for scoring after training itself, but that request carries no token: with
    // authentication on it is refused, so the page asks (429: it is already running, followed)
    if (done && kind === "train" && state.can.score) await runTask("score");
  } catch (err) {
    showTask(String(err.message || err), "error");
  } finally {
    $(task.button).disabled = false;
  }
}

async function pollTask(task) {
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    const response = await api("GET", task.status);
    const status = response.ok ? await response.json() : null;
    const current = status ? status.status : "SUBMITTED";
    if (current === "DONE") {
      showTask(task.what + ": done" + (status.end_ts ? " at " + status.end_ts : ""), "done");
      break;
    }
    if (current === "ERROR" || current === "STOPPED") {
      const details = status.details || [];
      showTask(task.what + ": " + current.toLowerCase() + (details.length ? " (" + details[details.length - 1] + ")" : ""),
        "error");
      return false;
    }
    showTask(task.what + ": " + current.toLowerCase() + (status && status.start_ts ? " since " + status.start_ts : ""),
      "running");
  }
  await loadInfo().catch(() => {});  // a new validation accuracy after training
  if (!state.busy && state.backIndex === null) await next();  // the review order changed
  return true;
}

$("train").addEventListener("click", () => runTask("train"));
$("score").addEventListener("click", () => runTask("score"));

// ---- keys ----

document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement || event.target instanceof HTMLTextAreaElement) {
    if (event.key === "Escape") event.target.blur();
    return;
  }
  if (event.altKey || event.ctrlKey || event.metaKey) return;
  if (event.key === "Enter" && event.target instanceof HTMLButtonElement) return;  // the focused button's own click
  if ($("review").hidden || $("buttons").hidden) return;
  const index = Number.parseInt(event.key, 10);
  const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
  const actions = {
    k: () => save(state.label), Enter: () => save(state.label),
    u: () => { $("unsure").checked = !$("unsure").checked; },
    z: undo, Backspace: undo, b: back, ArrowLeft: back, n: () => { if (!state.busy) next(); },
    "+": () => zoomBy(1.25), "=": () => zoomBy(1.25), "-": () => zoomBy(0.8),
    f: () => { state.view.fit = true; applyZoom(); }, r: () => setWindow(255, 127.5),
  };
  if (index >= 1 && index <= state.classes.length) {
    event.preventDefault();
    save(state.classes[index - 1]);
  } else if (actions[key]) {
    event.preventDefault();
    actions[key]();
  }
});

$("token-save").addEventListener("click", () => {
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token-form").hidden = true;
  init();
});

init();
