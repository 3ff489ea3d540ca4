// The annotator's review loop against the app's own REST API (no build step, no dependencies):
//   GET  /info/                                   class names (labels) and the model
//   POST /activelearning/most_suspicious          next image (409 with what to do when there is none)
//   GET  /datastore/label?label=<id>&tag=final    its current label file (the patient group is kept on save)
//   GET  /review/image?image=<id>                 the image as PNG
//   POST /infer/<model>?image=<id>&output=json    the model's probabilities
//   PUT  /datastore/label?image=<id>&tag=final    save the label (<id>.label.json), then the next image
// After each image is shown, document.body.dataset holds imageId and shownMs (time from the request
// for the next image to the image and probabilities on screen), read by the browser test.
"use strict";

const ROOT = new URL("../", window.location.href);  // the page is served at <server>/review/
const TOKEN_KEY = "robustmri-review-token";
const state = { classes: [], model: null, sample: null, label: null, group: null, busy: false, imageUrl: null };
const $ = (id) => document.getElementById(id);

class ApiError extends Error {}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

async function api(method, path, body) {
  // the server refuses a state-changing request without X-Requested-With (no other site's page can send it)
  const headers = { ...authHeaders(), "X-Requested-With": "robustmri-review" };
  const response = await fetch(new URL(path, ROOT), { method, headers, body });
  if (response.status === 401 || response.status === 403) {
    $("token-form").hidden = false;
    throw new ApiError("the server asks for authentication (HTTP " + response.status + ")");
  }
  return response;
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

function showMessage(text, isError) {
  const box = $("message");
  box.textContent = text;
  box.className = isError ? "error" : "";
  box.hidden = false;
}

function showProgress(progress) {
  for (const key of ["reviewed", "pending", "corrected"]) {
    $(key).textContent = progress && progress[key] !== undefined ? progress[key] : "–";
  }
}

function setBusy(busy) {
  state.busy = busy;
  for (const button of $("buttons").querySelectorAll("button")) button.disabled = busy;
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
  $("key-help").innerHTML = state.classes.map((name, k) => "<kbd>" + (k + 1) + "</kbd> " + name).join(", ");
}

async function init() {
  try {
    const response = await api("GET", "info/");
    if (!response.ok) throw new ApiError("GET /info/: HTTP " + response.status);
    const info = await response.json();
    state.classes = info.labels || [];
    state.model = Object.keys(info.models || {})[0] || null;
    buildButtons();
    await next();
  } catch (err) {
    showMessage(String(err.message || err), true);
  }
}

async function next() {
  const started = performance.now();
  setBusy(true);
  try {
    const response = await api("POST", "activelearning/most_suspicious");
    if (response.status === 409) {  // nothing to review: the server says what to do instead
      const body = await detail(response);
      $("review").hidden = true;
      showProgress(body.progress);
      showMessage(body.message || JSON.stringify(body), false);
      return;
    }
    if (!response.ok) throw new ApiError("next image: HTTP " + response.status + " " + JSON.stringify(await detail(response)));
    const sample = await response.json();
    const id = sample.id;
    const query = "?image=" + encodeURIComponent(id);
    const [labelFile, image, prediction] = await Promise.all([
      api("GET", "datastore/label?label=" + encodeURIComponent(id) + "&tag=final").then((r) => r.ok ? r.json() : null),
      api("GET", "review/image" + query).then(async (r) => r.ok ? r.blob() : Promise.reject(
        new ApiError("image " + id + ": " + JSON.stringify(await detail(r))))),
      state.model
        ? api("POST", "infer/" + encodeURIComponent(state.model) + query + "&output=json").then(async (r) =>
            r.ok ? r.json() : { error: "HTTP " + r.status + " " + JSON.stringify(await detail(r)) })
        : Promise.resolve({ error: "no trained model: train first (POST /train/brain_tumour)" }),
    ]);
    state.sample = sample;
    state.label = labelFile && labelFile.label !== undefined ? labelFile.label : sample.label;
    if (typeof state.label === "number") state.label = state.classes[state.label];
    state.group = labelFile && labelFile.group !== undefined ? labelFile.group : null;
    await render(sample, image, prediction);
    const shownMs = performance.now() - started;
    document.body.dataset.imageId = id;
    document.body.dataset.shownMs = shownMs.toFixed(0);
    $("status").textContent = "shown in " + shownMs.toFixed(0) + " ms";
  } catch (err) {
    showMessage(String(err.message || err), true);
  } finally {
    setBusy(false);
  }
}

function render(sample, imageBlob, prediction) {
  $("message").hidden = true;
  $("review").hidden = false;
  showProgress(sample);
  $("image-id").textContent = sample.id;
  $("suspicion").textContent = "Suspicion: rank " + sample.rank + " of " + sample.of +
    " (in the most suspicious " + sample.percentile + " %)";
  $("explanation").textContent = sample.explanation || "";
  $("current-label").textContent = state.label;
  const rows = $("probabilities").querySelector("tbody");
  rows.textContent = "";
  if (prediction.error) {
    const row = rows.insertRow();
    row.insertCell().textContent = "model: " + prediction.error;
  } else {
    for (const name of state.classes) {
      const p = prediction.probabilities[name];
      const row = rows.insertRow();
      row.dataset.label = name;
      if (name === state.label) row.className = "current";
      row.insertCell().textContent = name;
      const bar = row.insertCell();
      bar.className = "bar";
      const fill = document.createElement("div");
      fill.style.width = (100 * p).toFixed(1) + "%";
      bar.appendChild(fill);
      row.insertCell().textContent = (100 * p).toFixed(1) + " %";
    }
  }
  for (const button of $("buttons").querySelectorAll("button[data-label]")) {
    button.classList.toggle("current", button.dataset.label === state.label);
  }
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  state.imageUrl = URL.createObjectURL(imageBlob);
  const img = $("image");
  return new Promise((resolve) => {
    img.onload = () => resolve();
    img.onerror = () => resolve();
    img.src = state.imageUrl;
  });
}

async function save(label) {
  if (state.busy || !state.sample || !label) return;
  setBusy(true);
  const id = state.sample.id;
  try {
    const content = state.group === null ? { label } : { label, group: state.group };
    const form = new FormData();
    form.append("label", new File([JSON.stringify(content)], id + ".label.json", { type: "application/json" }));
    const response = await api("PUT", "datastore/label?image=" + encodeURIComponent(id) + "&tag=final", form);
    if (!response.ok) throw new ApiError("label of " + id + " not saved: " + JSON.stringify(await detail(response)));
    $("status").textContent = id + ": " + (label === state.label ? "kept " : "changed to ") + label;
  } catch (err) {
    showMessage(String(err.message || err), true);
    setBusy(false);
    return;
  }
  await next();
}

document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement || event.altKey || event.ctrlKey || event.metaKey) return;
  if (event.key === "Enter" && event.target instanceof HTMLButtonElement) return;  // the focused button's own click
  const index = Number.parseInt(event.key, 10);
  if (index >= 1 && index <= state.classes.length) {
    event.preventDefault();
    save(state.classes[index - 1]);
  } else if (event.key === "k" || event.key === "K" || event.key === "Enter") {
    event.preventDefault();
    save(state.label);
  }
});

$("token-save").addEventListener("click", () => {
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token-form").hidden = true;
  init();
});

init();
