// One job: live charts and event log from its SSE stream, details, hyperparameters, memory
// estimate, checkpoints, and the actions the API offers (cancel, pause, resume, download).

import { api, download, followEvents } from "../api.js";
import { JobCharts } from "../charts.js";
import {
  ACTIVE,
  DASH,
  cell,
  definitionList,
  el,
  errorBox,
  fmtBytes,
  fmtDuration,
  fmtInt,
  fmtNumber,
  plainError,
  progressBar,
  replace,
  setProgress,
  statusBadge,
  table,
  timeEl,
  toast,
} from "../ui.js";

const MAX_LOG = 1000;

export function render(root, [jobId]) {
  const base = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
  const title = el("h1", { class: "mono break" }, jobId);
  const badge = el("span", { id: "job-status" });
  const actions = el("div", { class: "toolbar", role: "group", "aria-label": "Job actions" });
  const failure = el("div", { id: "job-error" });
  const bar = progressBar(0, null, "Training progress");
  const progressText = el("p", { class: "progress-text", id: "job-progress" }, DASH);
  const streamState = el("span", { class: "muted stream-state", "aria-live": "polite" });
  const details = el("div");
  const hyper = el("div");
  const estimate = el("div", { id: "job-estimate" });
  const checkpoints = el("div");
  const chartBox = el("div", { class: "charts" });
  const log = el("ol", { id: "event-log", class: "event-log", reversed: true });

  replace(
    root,
    el("p", {}, el("a", { href: "#/jobs" }, "← All jobs")),
    el("div", { class: "page-head" }, el("div", { class: "title-row" }, title, badge), actions),
    failure,
    el(
      "section",
      { class: "card", "aria-labelledby": "progress-h" },
      el("h2", { id: "progress-h" }, "Progress ", streamState),
      bar,
      progressText,
      chartBox,
    ),
    el(
      "div",
      { class: "grid-2" },
      el(
        "section",
        { class: "card", "aria-labelledby": "details-h" },
        el("h2", { id: "details-h" }, "Details"),
        details,
      ),
      el(
        "section",
        { class: "card", "aria-labelledby": "estimate-h" },
        el("h2", { id: "estimate-h" }, "Memory estimate"),
        estimate,
      ),
    ),
    el(
      "section",
      { class: "card", "aria-labelledby": "ckpt-h" },
      el("h2", { id: "ckpt-h" }, "Checkpoints"),
      checkpoints,
    ),
    el(
      "div",
      { class: "grid-2" },
      el(
        "section",
        { class: "card", "aria-labelledby": "hyper-h" },
        el("h2", { id: "hyper-h" }, "Hyperparameters"),
        hyper,
      ),
      el(
        "section",
        { class: "card", "aria-labelledby": "log-h" },
        el("h2", { id: "log-h" }, "Events"),
        el("div", { class: "log-box", tabindex: "0", role: "region", "aria-label": "Event log" }, log),
      ),
    ),
  );

  const charts = new JobCharts(chartBox);
  let job = null;
  let closed = false;
  let stopStream = null;
  let logCount = 0;

  function drawJob() {
    replace(badge, statusBadge(job.status));
    const p = job.progress || {};
    setProgress(bar, p.step || 0, p.total_steps);
    drawProgressText();
    replace(
      failure,
      job.status === "failed" && job.error
        ? el(
            "div",
            { class: "error-box", role: "alert" },
            el("strong", {}, "This job failed. "),
            plainError(job.error),
          )
        : null,
    );
    drawActions();
    replace(
      details,
      definitionList([
        ["Base model", job.model],
        ["Fine-tuned model", job.fine_tuned_model ? el("span", { class: "mono break" }, job.fine_tuned_model) : null],
        ["Training file", el("span", { class: "mono" }, job.training_file)],
        ["Validation file", job.validation_file ? el("span", { class: "mono" }, job.validation_file) : "held out from training"],
        ["Method", (job.method && job.method.type) || "supervised"],
        ["GPU class", job.gpu_class],
        ["Attempt", `${job.attempt} of ${job.max_attempts}`],
        ["Trained tokens", fmtInt(job.trained_tokens)],
        ["Created", timeEl(job.created_at)],
        ["Finished", timeEl(job.finished_at)],
        ["Seed", String(job.seed)],
      ]),
    );
    const spec = job.qlora || {};
    replace(
      hyper,
      definitionList(
        Object.keys(spec)
          .sort()
          .map((k) => [k, formatValue(spec[k])]),
      ),
    );
    replace(estimate, estimateView(job.estimate, job.gpu_class));
  }

  function drawProgressText() {
    const p = job.progress || {};
    const parts = [
      p.total_steps ? `Step ${p.step} of ${p.total_steps}` : `Step ${p.step || 0}`,
      `loss ${fmtNumber(p.loss)}`,
      `eval loss ${fmtNumber(p.eval_loss)}`,
      `${fmtInt(p.tokens_per_second)} tokens/s`,
    ];
    if (job.status === "running") parts.push(`ETA ${fmtDuration(p.eta_seconds)}`);
    progressText.textContent = parts.join(" · ");
  }

  function button(label, onClick, cls = "secondary", ariaLabel = null) {
    return el(
      "button",
      { type: "button", class: cls, onclick: onClick, "aria-label": ariaLabel },
      label,
    );
  }

  function drawActions() {
    const items = [];
    if (job.status === "running" || job.status === "queued") {
      items.push(button("Pause", () => act("pause", "Pause requested.")));
    }
    if (job.status === "paused") items.push(button("Resume", () => act("resume", "Resumed.")));
    if (ACTIVE.has(job.status)) {
      items.push(
        button(
          "Cancel job",
          () => {
            if (window.confirm(`Cancel ${job.id}? Its progress is lost.`)) {
              act("cancel", "Cancellation requested.");
            }
          },
          "danger",
        ),
      );
    }
    if (job.adapter_id) {
      items.push(
        button(
          "Download adapter",
          () => save(`/v1/adapters/${job.adapter_id}/download`, `${job.adapter_id}.tar.gz`),
          "primary",
        ),
      );
    }
    replace(actions, items);
  }

  async function act(verb, done) {
    try {
      job = await api(`${base}/${verb}`, { method: "POST" });
      drawJob();
      toast(done);
    } catch (exc) {
      toast(exc.message, "error");
    }
  }

  async function save(path, name) {
    try {
      const size = await download(path, name);
      toast(`Downloaded ${name} (${fmtBytes(size)}).`);
    } catch (exc) {
      toast(exc.message, "error");
    }
  }

  async function refreshJob() {
    try {
      job = await api(base);
      if (!closed) drawJob();
    } catch (exc) {
      if (!closed) toast(exc.message, "error");
    }
  }

  async function refreshCheckpoints() {
    try {
      const list = await api(`${base}/checkpoints?limit=100`);
      if (closed) return;
      replace(
        checkpoints,
        table({
          caption: "Checkpoints kept for this job",
          columns: [
            { label: "Step" },
            { label: "Train loss" },
            { label: "Eval loss" },
            { label: "Other metrics" },
            { label: "Saved" },
            { label: "Download" },
          ],
          rows: list.data.map((c) =>
            el(
              "tr",
              {},
              cell("Step", String(c.step_number)),
              cell("Train loss", fmtNumber(c.metrics.train_loss)),
              cell("Eval loss", fmtNumber(c.metrics.valid_loss)),
              cell("Other metrics", otherMetrics(c.metrics)),
              cell("Saved", timeEl(c.created_at)),
              cell(
                "Download",
                button(
                  "Download",
                  () => save(c.download_url, `${job.id}-step-${c.step_number}.tar.gz`),
                  "link",
                  `Download checkpoint at step ${c.step_number}`,
                ),
              ),
            ),
          ),
          empty: "No checkpoint yet.",
          className: "responsive",
        }),
      );
    } catch (exc) {
      if (!closed) replace(checkpoints, errorBox(exc));
    }
  }

  function addLog(event) {
    logCount += 1;
    const item = el(
      "li",
      { class: `level-${event.level}` },
      timeEl(event.created_at),
      " ",
      el("span", { class: "level" }, event.level),
      " ",
      event.message,
    );
    log.prepend(item);
    if (logCount > MAX_LOG) log.lastElementChild.remove();
  }

  function onEvent(ev) {
    let event;
    try {
      event = JSON.parse(ev.data);
    } catch {
      return;
    }
    addLog(event);
    const data = event.data || {};
    if (event.type === "metrics") {
      charts.add(data);
      if (job && typeof data.step === "number" && typeof data.loss === "number") {
        const p = job.progress;
        p.step = Math.max(p.step || 0, data.step);
        if (typeof data.total_steps === "number") p.total_steps = data.total_steps;
        p.loss = data.loss;
        if (typeof data.tokens_per_second === "number") p.tokens_per_second = data.tokens_per_second;
        if (typeof data.eta_seconds === "number") p.eta_seconds = data.eta_seconds;
        setProgress(bar, p.step, p.total_steps);
        drawProgressText();
      } else if (job && typeof data.eval_loss === "number") {
        job.progress.eval_loss = data.eval_loss;
        drawProgressText();
      }
    }
    if (data.status) refreshJob();
    if (typeof data.checkpoint_step === "number") refreshCheckpoints();
  }

  (async () => {
    await refreshJob();
    if (closed || !job) return;
    refreshCheckpoints();
    // From the first event: the log and the charts are rebuilt from the stored events, then
    // follow live ones; a dropped connection resumes with Last-Event-ID.
    stopStream = followEvents(jobId, {
      onEvent,
      onDone: () => {
        refreshJob();
        refreshCheckpoints();
      },
      onState: (state) => {
        streamState.textContent =
          state === "live" ? "(live)" : state === "reconnecting" ? "(reconnecting…)" : "";
        root.dataset.stream = state;
      },
    });
  })();

  return () => {
    closed = true;
    if (stopStream) stopStream();
    charts.destroy();
  };
}

// A checkpoint's figures beyond step and losses (token accuracy, DPO rewards…), one a line.
function otherMetrics(metrics) {
  const shown = Object.entries(metrics || {}).filter(
    ([k, v]) => !["step", "train_loss", "valid_loss"].includes(k) && typeof v === "number",
  );
  if (!shown.length) return DASH;
  return el(
    "ul",
    { class: "plain" },
    shown.map(([k, v]) => el("li", {}, `${k.replaceAll("_", " ")}: ${fmtNumber(v)}`)),
  );
}

function formatValue(v) {
  if (v === null || v === undefined) return DASH;
  if (Array.isArray(v)) return v.join(", ");
  if (typeof v === "number") return fmtNumber(v, 6);
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

export function estimateView(est, gpuClass) {
  if (!est) return el("p", { class: "muted" }, "No estimate recorded.");
  // A job's recorded estimate has the parts at the top; POST /v1/estimates under `parts`.
  const parts = Object.entries({ ...est, ...(est.parts || {}) })
    .filter(([k, v]) => k.endsWith("_bytes") && !["total_bytes", "compute_bytes"].includes(k) && typeof v === "number")
    .map(([k, v]) => [k.replace(/_bytes$/, "").replaceAll("_", " "), fmtBytes(v)]);
  return definitionList([
    ["Total", el("strong", {}, fmtBytes(est.total_bytes))],
    ["GPU class", est.gpu_class || gpuClass || DASH],
    ["Trainable parameters", fmtInt(est.trainable_params)],
    ...parts,
  ]);
}
