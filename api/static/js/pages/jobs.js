// Jobs: every job of the tenant with live progress. The list is re-read every few seconds (new
// jobs, status changes); each active job's SSE stream moves its progress bar between reads.

import { api, followEvents, listAll } from "../api.js";
import {
  ACTIVE,
  DASH,
  STATUSES,
  cell,
  el,
  fmtDuration,
  fmtInt,
  fmtNumber,
  progressBar,
  replace,
  setProgress,
  statusBadge,
  table,
  timeEl,
} from "../ui.js";

const POLL_MS = 4000;
// Browsers hold about six connections per origin: leave room for the page's own requests.
const MAX_STREAMS = 3;

export function render(root) {
  const filter = el(
    "select",
    { id: "status-filter", name: "status" },
    el("option", { value: "" }, "All statuses"),
    STATUSES.map((s) => el("option", { value: s }, s.replace("_", " "))),
  );
  const live = el("p", { class: "muted live-note", "aria-live": "polite" }, "Loading…");
  const holder = el("div", { class: "table-holder" });
  replace(
    root,
    el(
      "div",
      { class: "page-head" },
      el("h1", {}, "Jobs"),
      el(
        "div",
        { class: "toolbar" },
        el("label", { for: "status-filter" }, "Status"),
        filter,
        el("a", { class: "button", href: "#/new" }, "New job"),
      ),
    ),
    live,
    holder,
  );

  let jobs = [];
  const streams = new Map(); // job id -> {stop}
  const rows = new Map(); // job id -> {tr, job}
  let timer = null;
  let closed = false;

  function rowOf(job) {
    const p = job.progress || {};
    const bar = progressBar(p.step || 0, p.total_steps, `Progress of ${job.id}`);
    const steps = el("span", { class: "steps" }, stepText(job));
    const eta = el("span", { class: "eta muted" }, etaText(job));
    const tr = el(
      "tr",
      { dataset: { id: job.id, status: job.status } },
      cell(
        "Job",
        el("a", { href: `#/jobs/${job.id}`, class: "mono" }, job.id),
        job.user_provided_suffix ? el("div", { class: "muted" }, job.user_provided_suffix) : null,
      ),
      cell("Status", statusBadge(job.status)),
      cell("Base model", job.model),
      cell("Dataset", el("span", { class: "mono" }, job.training_file)),
      cell("Progress", el("div", { class: "progress-cell" }, bar, steps, eta)),
      cell("Trained tokens", el("span", { class: "tokens" }, fmtInt(job.trained_tokens))),
      cell("Created", timeEl(job.created_at)),
      cell("Finished", timeEl(job.finished_at)),
    );
    rows.set(job.id, { tr, job, bar, steps, eta });
    return tr;
  }

  let drawn = "";

  // Redrawn only when something shown changed, so a focused link or button stays focused.
  function draw() {
    const wanted = filter.value;
    const signature = JSON.stringify([
      wanted,
      jobs.map((j) => [j.id, j.status, j.progress, j.trained_tokens, j.finished_at]),
    ]);
    if (signature === drawn) return;
    drawn = signature;
    const shown = jobs.filter((j) => !wanted || j.status === wanted);
    rows.clear();
    replace(
      holder,
      table({
        caption: wanted ? `Jobs with status ${wanted.replace("_", " ")}` : "All jobs",
        columns: [
          { label: "Job" },
          { label: "Status" },
          { label: "Base model" },
          { label: "Dataset" },
          { label: "Progress", className: "wide" },
          { label: "Trained tokens" },
          { label: "Created" },
          { label: "Finished" },
        ],
        rows: shown.map(rowOf),
        empty: wanted ? "No job has this status." : "No jobs yet: start one from New job.",
        className: "responsive jobs",
      }),
    );
  }

  function onProgress(jobId, data) {
    const row = rows.get(jobId);
    const job = jobs.find((j) => j.id === jobId);
    if (!job || typeof data.step !== "number") return;
    const p = (job.progress = { ...job.progress });
    p.step = data.step;
    if (typeof data.total_steps === "number") p.total_steps = data.total_steps;
    if (typeof data.eta_seconds === "number") p.eta_seconds = data.eta_seconds;
    if (typeof data.loss === "number") p.loss = data.loss;
    if (!row) return;
    row.tr.dataset.streamedStep = String(p.step); // moved by the stream, between list reads
    setProgress(row.bar, p.step, p.total_steps);
    row.steps.textContent = stepText(job);
    row.eta.textContent = etaText(job);
  }

  async function refreshOne(jobId) {
    try {
      const fresh = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`);
      const i = jobs.findIndex((j) => j.id === jobId);
      if (i !== -1 && !closed) {
        jobs[i] = fresh;
        draw();
        syncStreams();
      }
    } catch {
      /* the next poll catches up */
    }
  }

  function syncStreams() {
    const active = jobs.filter((j) => ACTIVE.has(j.status)).slice(0, MAX_STREAMS);
    const keep = new Set(active.map((j) => j.id));
    for (const [id, entry] of streams) {
      if (!keep.has(id)) {
        entry.stop();
        streams.delete(id);
      }
    }
    for (const job of active) {
      if (!streams.has(job.id)) streams.set(job.id, startStream(job.id));
    }
    live.textContent = active.length
      ? `Live: following ${active.length} active job(s).`
      : "Up to date; new jobs appear on their own.";
  }

  function startStream(jobId) {
    const entry = { stopped: false, stopStream: null };
    entry.stop = () => {
      entry.stopped = true;
      if (entry.stopStream) entry.stopStream();
    };
    (async () => {
      // Only what happens from now on: the list already shows the job's state.
      let newest = null;
      try {
        const path = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?limit=1`;
        const page = await api(path);
        newest = page.data.length ? page.data[0].id : null;
      } catch {
        newest = null;
      }
      if (entry.stopped) return;
      entry.stopStream = followEvents(jobId, {
        lastEventId: newest,
        onEvent: (ev) => {
          let parsed = null;
          try {
            parsed = JSON.parse(ev.data);
          } catch {
            return;
          }
          const data = parsed.data || {};
          if (parsed.type === "metrics") onProgress(jobId, data);
          if (data.status) refreshOne(jobId);
        },
        onDone: () => refreshOne(jobId),
      });
    })();
    return entry;
  }

  async function poll() {
    try {
      jobs = await listAll("/v1/fine_tuning/jobs", { max: 200 });
      if (closed) return;
      draw();
      syncStreams();
    } catch (exc) {
      if (!closed) live.textContent = `Could not load jobs: ${exc.message}`;
    }
    if (!closed) timer = setTimeout(poll, POLL_MS);
  }

  filter.addEventListener("change", draw);
  poll();

  return () => {
    closed = true;
    clearTimeout(timer);
    for (const entry of streams.values()) entry.stop();
    streams.clear();
  };
}

function stepText(job) {
  const p = job.progress || {};
  if (!p.total_steps) return p.step ? `step ${p.step}` : DASH;
  return `${p.step} / ${p.total_steps}`;
}

function etaText(job) {
  const p = job.progress || {};
  if (job.status !== "running") {
    return typeof p.loss === "number" ? `loss ${fmtNumber(p.loss)}` : "";
  }
  const eta = typeof p.eta_seconds === "number" ? `ETA ${fmtDuration(p.eta_seconds)}` : "";
  const loss = typeof p.loss === "number" ? `loss ${fmtNumber(p.loss)}` : "";
  return [eta, loss].filter(Boolean).join(" · ");
}
