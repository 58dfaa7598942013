// New job: base model, files and the common QLoRA knobs; the memory estimate and GPU class
// follow the form as it changes (`POST /v1/estimates`, debounced); submit creates the job.

import { api, listAll } from "../api.js";
import { debounce, el, errorBox, fmtBytes, fmtInt, replace, toast } from "../ui.js";
import { estimateView } from "./job.js";

// The knobs, as `qlora` (TrainSpec) fields, with TrainSpec's defaults.
const COMMON = [
  { name: "rank", label: "LoRA rank (r)", type: "int", value: 16, min: 1, max: 1024 },
  { name: "alpha", label: "LoRA alpha", type: "float", value: 32, min: 0, step: "any" },
  { name: "dropout", label: "LoRA dropout", type: "float", value: 0.05, min: 0, max: 0.99, step: "any" },
  { name: "num_epochs", label: "Epochs", type: "int", value: 3, min: 1, max: 100 },
  { name: "learning_rate", label: "Learning rate", type: "float", value: 0.0002, min: 0, step: "any" },
  { name: "max_seq_length", label: "Max sequence length (tokens)", type: "int", value: 2048, min: 8 },
];
const ADVANCED = [
  { name: "max_steps", label: "Max steps (overrides epochs)", type: "int", min: 1 },
  { name: "batch_size", label: "Batch size", type: "int", value: 4, min: 1, max: 1024 },
  { name: "gradient_accumulation_steps", label: "Gradient accumulation steps", type: "int", value: 4, min: 1 },
  { name: "warmup_ratio", label: "Warmup ratio", type: "float", value: 0.03, min: 0, max: 0.99, step: "any" },
  { name: "eval_steps", label: "Evaluate every N steps", type: "int", min: 1 },
  { name: "checkpoint_steps", label: "Checkpoint every N steps", type: "int", value: 200, min: 1 },
  { name: "lr_scheduler", label: "LR schedule", type: "select", options: ["cosine", "linear", "constant"] },
  { name: "quant_type", label: "Base quantization", type: "select", options: ["nf4", "fp4", "none"] },
  { name: "compute_dtype", label: "Compute dtype", type: "select", options: ["bfloat16", "float16", "float32"] },
  {
    name: "optimizer",
    label: "Optimizer",
    type: "select",
    options: ["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch"],
  },
  { name: "seed", label: "Seed", type: "int", min: 0 },
];

function field(spec) {
  const id = `f-${spec.name}`;
  let input;
  if (spec.type === "select") {
    input = el("select", { id, name: spec.name }, spec.options.map((o) => el("option", { value: o }, o)));
  } else {
    input = el("input", {
      id,
      name: spec.name,
      type: "number",
      inputmode: spec.type === "int" ? "numeric" : "decimal",
      min: spec.min,
      max: spec.max,
      step: spec.step || (spec.type === "int" ? 1 : "any"),
      value: spec.value,
      placeholder: spec.value === undefined ? "default" : null,
    });
  }
  input.dataset.kind = spec.type;
  return el("div", { class: "field" }, el("label", { for: id }, spec.label), input);
}

export function render(root, _params, query) {
  const model = el("select", { id: "f-model", name: "model", required: true });
  const training = el("select", { id: "f-training_file", name: "training_file", required: true });
  const validation = el("select", { id: "f-validation_file", name: "validation_file" });
  const method = el(
    "select",
    { id: "f-method", name: "method" },
    el("option", { value: "supervised" }, "Supervised"),
    el("option", { value: "dpo" }, "DPO (preference pairs)"),
  );
  const beta = el("input", {
    id: "f-beta",
    name: "beta",
    type: "number",
    inputmode: "decimal",
    min: 0,
    max: 100,
    step: "any",
    placeholder: "auto (0.1)",
  });
  const betaField = el(
    "div",
    { class: "field", hidden: true },
    el("label", { for: "f-beta" }, "DPO beta"),
    beta,
  );
  method.addEventListener("change", () => {
    betaField.hidden = method.value !== "dpo";
  });
  const suffix = el("input", {
    id: "f-suffix",
    name: "suffix",
    type: "text",
    maxlength: 64,
    pattern: "[A-Za-z0-9_.\\-]+",
    placeholder: "e.g. support-bot",
  });
  const targets = el("input", {
    id: "f-target_modules",
    name: "target_modules",
    type: "text",
    value: "all-linear",
    "aria-describedby": "targets-help",
  });
  const packing = el("input", { id: "f-packing", name: "packing", type: "checkbox", checked: true });
  const estimate = el("div", { id: "estimate", "aria-live": "polite", dataset: { state: "idle" } });
  const formError = el("div", { id: "form-error" });
  const submit = el("button", { type: "submit", class: "primary" }, "Start fine-tuning");
  const knobs = COMMON.map(field);
  const advanced = ADVANCED.map(field);
  const form = el(
    "form",
    { id: "new-job", novalidate: true, "aria-labelledby": "new-h" },
    el(
      "section",
      { class: "card" },
      el("h2", {}, "Model and data"),
      el(
        "div",
        { class: "fields" },
        el("div", { class: "field" }, el("label", { for: "f-model" }, "Base model"), model),
        el("div", { class: "field" }, el("label", { for: "f-training_file" }, "Training file"), training),
        el(
          "div",
          { class: "field" },
          el("label", { for: "f-validation_file" }, "Validation file"),
          validation,
        ),
        el("div", { class: "field" }, el("label", { for: "f-method" }, "Method"), method),
        betaField,
        el("div", { class: "field" }, el("label", { for: "f-suffix" }, "Name suffix (optional)"), suffix),
      ),
    ),
    el(
      "section",
      { class: "card" },
      el("h2", {}, "QLoRA settings"),
      el(
        "div",
        { class: "fields" },
        knobs,
        el(
          "div",
          { class: "field" },
          el("label", { for: "f-target_modules" }, "Target modules"),
          targets,
          el("small", { id: "targets-help", class: "muted" }, "all-linear, or names: q_proj, v_proj"),
        ),
        el(
          "div",
          { class: "field check" },
          packing,
          el("label", { for: "f-packing" }, "Packing (padding-free)"),
        ),
      ),
      el(
        "details",
        {},
        el("summary", {}, "Advanced settings"),
        el("div", { class: "fields" }, advanced),
      ),
    ),
    formError,
    el("div", { class: "toolbar" }, submit),
  );
  replace(
    root,
    el("div", { class: "page-head" }, el("h1", { id: "new-h" }, "New fine-tuning job")),
    el(
      "div",
      { class: "new-job-layout" },
      form,
      el(
        "aside",
        { class: "card estimate-card", "aria-labelledby": "est-h" },
        el("h2", { id: "est-h" }, "Memory estimate"),
        estimate,
      ),
    ),
  );

  let closed = false;
  let asked = 0;
  // One key per form: a double-click or a retried submit creates one job.
  let idempotencyKey = crypto.randomUUID();

  function body() {
    const qlora = {};
    for (const input of form.querySelectorAll("[data-kind]")) {
      const raw = input.value.trim();
      if (raw === "") continue;
      if (input.dataset.kind === "int") qlora[input.name] = Number.parseInt(raw, 10);
      else if (input.dataset.kind === "float") qlora[input.name] = Number(raw);
      else qlora[input.name] = raw;
    }
    const t = targets.value.trim();
    if (t) {
      qlora.target_modules =
        t === "all-linear" ? t : t.split(/[\s,]+/).filter(Boolean);
    }
    qlora.packing = packing.checked;
    if (qlora.quant_type === "none") qlora.double_quant = false;
    const out = { model: model.value, training_file: training.value, qlora };
    if (validation.value) out.validation_file = validation.value;
    if (suffix.value.trim()) out.suffix = suffix.value.trim();
    if (method.value === "dpo") {
      out.method = { type: "dpo" };
      if (beta.value.trim() !== "") {
        out.method.dpo = { hyperparameters: { beta: Number(beta.value) } };
      }
    }
    return out;
  }

  function markInvalid(param) {
    for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
    if (!param) return;
    const name = /beta$/.test(param) ? "beta" : param.replace(/^qlora\./, "").split(".")[0];
    const input = form.querySelector(`[name="${CSS.escape(name)}"]`);
    if (input) input.setAttribute("aria-invalid", "true");
  }

  const updateEstimate = debounce(async () => {
    if (!model.value || !training.value) {
      estimate.dataset.state = "idle";
      replace(estimate, el("p", { class: "muted" }, "Pick a base model and a training file."));
      return;
    }
    const mine = ++asked;
    estimate.dataset.state = "loading";
    estimate.setAttribute("aria-busy", "true");
    try {
      const est = await api("/v1/estimates", { method: "POST", body: body() });
      if (closed || mine !== asked) return;
      markInvalid(null);
      estimate.dataset.state = "ok";
      replace(
        estimate,
        el(
          "p",
          { class: est.fits ? "fits" : "fits no" },
          est.fits
            ? `Fits a ${est.gpu_class} GPU (queue ${est.queue}).`
            : "Too large for every GPU class this service runs: lower the rank, sequence " +
                "length or batch size.",
        ),
        estimateView(est, est.gpu_class),
      );
    } catch (exc) {
      if (closed || mine !== asked) return;
      estimate.dataset.state = "error";
      markInvalid(exc.param);
      replace(estimate, errorBox(exc));
    } finally {
      if (mine === asked) estimate.removeAttribute("aria-busy");
    }
  }, 350);

  form.addEventListener("input", () => {
    updateEstimate();
  });
  form.addEventListener("change", () => {
    updateEstimate();
  });

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    replace(formError);
    if (!model.value || !training.value) {
      replace(formError, errorBox({ message: "Pick a base model and a training file first." }));
      return;
    }
    submit.disabled = true;
    try {
      const job = await api("/v1/fine_tuning/jobs", {
        method: "POST",
        body: body(),
        headers: { "Idempotency-Key": idempotencyKey },
      });
      toast(`Created ${job.id}.`);
      location.hash = `#/jobs/${job.id}`;
    } catch (exc) {
      markInvalid(exc.param);
      replace(formError, errorBox(exc));
      if (exc.status >= 400 && exc.status < 500) idempotencyKey = crypto.randomUUID();
    } finally {
      submit.disabled = false;
    }
  });

  (async () => {
    try {
      const [models, files] = await Promise.all([
        api("/v1/models"),
        listAll("/v1/files?purpose=fine-tune", { max: 1000 }),
      ]);
      if (closed) return;
      const bases = models.data.filter((m) => !m.id.startsWith("ft:"));
      replace(
        model,
        el("option", { value: "" }, bases.length ? "Choose a base model" : "No base model registered"),
        bases.map((m) => el("option", { value: m.id }, m.id)),
      );
      if (bases.length === 1) model.value = bases[0].id;
      const label = (f) => `${f.filename} · ${f.format} · ${fmtInt(f.rows)} rows · ${fmtBytes(f.bytes)} (${f.id})`;
      replace(
        training,
        el("option", { value: "" }, files.length ? "Choose a file" : "Upload a dataset first"),
        files.map((f) => el("option", { value: f.id }, label(f))),
      );
      replace(
        validation,
        el("option", { value: "" }, "None: hold out a share of the training file"),
        files.map((f) => el("option", { value: f.id }, label(f))),
      );
      const wanted = query && query.get("file");
      if (wanted && files.some((f) => f.id === wanted)) training.value = wanted;
      else if (files.length) training.value = files[0].id;
      updateEstimate();
    } catch (exc) {
      if (!closed) toast(exc.message, "error");
    }
  })();

  return () => {
    closed = true;
    updateEstimate.cancel();
  };
}
