// DOM and formatting helpers. Text always goes in as text (never as HTML).

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2), value);
    } else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replace(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

export const DASH = "–";

export function fmtNumber(x, digits = 4) {
  if (typeof x !== "number" || !Number.isFinite(x)) return DASH;
  if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e6)) return x.toExponential(2);
  return Number(x.toFixed(digits)).toString();
}

export function fmtInt(x) {
  return typeof x === "number" && Number.isFinite(x) ? Math.round(x).toLocaleString("en") : DASH;
}

export function fmtBytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return DASH;
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

export function fmtTime(epochSeconds) {
  if (!epochSeconds) return DASH;
  const d = new Date(epochSeconds * 1000);
  return d.toLocaleString("en-GB", {
    year: "numeric",
    month: "short",
    day: "numeric",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
  });
}

export function timeEl(epochSeconds) {
  if (!epochSeconds) return DASH;
  return el(
    "time",
    { datetime: new Date(epochSeconds * 1000).toISOString() },
    fmtTime(epochSeconds),
  );
}

export function fmtDuration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds) || seconds < 0) return DASH;
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export const ACTIVE = new Set(["validating_files", "queued", "running", "paused"]);
export const STATUSES = [
  "validating_files",
  "queued",
  "running",
  "paused",
  "succeeded",
  "failed",
  "cancelled",
];

export function statusBadge(status) {
  return el(
    "span",
    { class: `badge status-${status}`, dataset: { status } },
    status.replace("_", " "),
  );
}

// A progress bar with an accessible name and value, plus the visible "step / total".
export function progressBar(step, total, label) {
  const known = typeof total === "number" && total > 0;
  const pct = known ? Math.min(100, (100 * step) / total) : 0;
  const bar = el("div", {
    class: "progress",
    role: "progressbar",
    "aria-label": label,
    "aria-valuemin": 0,
    "aria-valuemax": known ? total : null,
    "aria-valuenow": known ? step : null,
  });
  const fill = el("div", { class: "progress-fill" });
  fill.style.width = `${pct}%`;
  bar.append(fill);
  return bar;
}

export function setProgress(bar, step, total) {
  const known = typeof total === "number" && total > 0;
  bar.querySelector(".progress-fill").style.width =
    `${known ? Math.min(100, (100 * step) / total) : 0}%`;
  if (known) {
    bar.setAttribute("aria-valuemax", String(total));
    bar.setAttribute("aria-valuenow", String(step));
  }
}

let toastTimer = null;
export function toast(message, kind = "info") {
  const box = document.getElementById("toast");
  box.className = `toast-${kind}`;
  box.textContent = message;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    box.textContent = "";
    box.className = "";
  }, 6000);
}

// An error as a person reads it: the API's message, plus what the code means where known.
const PLAIN = {
  invalid_api_key: "The API key was not accepted.",
  invalid_file: "The file is not valid JSONL for fine-tuning.",
  out_of_memory: "The job ran out of GPU memory.",
  max_attempts_exceeded: "The job was retried too many times and gave up.",
  too_many_streams: "Too many live views are open; close some tabs.",
  store_unavailable: "Storage is unavailable right now; try again shortly.",
  rate_limit_exceeded: "Too many requests; try again shortly.",
};

export function plainError(error) {
  if (!error) return "";
  const lead = error.code && PLAIN[error.code] ? `${PLAIN[error.code]} ` : "";
  return `${lead}${error.message || "Something went wrong."}`;
}

export function errorBox(error) {
  return el("div", { class: "error-box", role: "alert" }, plainError(error));
}

// A table whose cells carry their column name, so CSS can stack rows as cards on phones.
export function table({ caption, columns, rows, empty = "Nothing here yet.", className = "" }) {
  const head = el(
    "thead",
    {},
    el(
      "tr",
      {},
      columns.map((c) => el("th", { scope: "col", class: c.className || null }, c.label)),
    ),
  );
  const body = el("tbody");
  for (const row of rows) body.append(row);
  if (rows.length === 0) {
    body.append(el("tr", { class: "empty" }, el("td", { colspan: columns.length }, empty)));
  }
  return el(
    "table",
    { class: `data ${className}` },
    caption ? el("caption", {}, caption) : null,
    head,
    body,
  );
}

export function cell(label, ...children) {
  return el("td", { "data-label": label }, el("div", { class: "cell" }, ...children));
}

export function definitionList(pairs) {
  return el(
    "dl",
    { class: "pairs" },
    pairs.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v === null || v === undefined ? DASH : v)]),
  );
}

export function debounce(fn, ms) {
  let timer = null;
  const wrapped = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  wrapped.cancel = () => clearTimeout(timer);
  return wrapped;
}
