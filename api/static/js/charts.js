// Live charts of a job's metrics events, drawn with uPlot (vendored by `make assets`).

import uPlot from "/static/vendor/uPlot.esm.js";

const COLORS = {
  loss: "#2459d6",
  eval: "#d9480f",
  lr: "#7a8699",
  tps: "#0b8a5f",
  margin: "#8e44ad",
  accuracy: "#c27c0e",
};

function widthOf(node) {
  return Math.max(240, Math.floor(node.clientWidth || 600));
}

// One chart in a <figure>: an accessible name, a summary for screen readers, `data-points`.
class Chart {
  constructor(parent, { id, title, series, axes, scales }) {
    this.figure = document.createElement("figure");
    this.figure.className = "chart";
    this.figure.id = id;
    this.figure.dataset.points = "0";
    const caption = document.createElement("figcaption");
    caption.textContent = title;
    this.plotBox = document.createElement("div");
    this.plotBox.setAttribute("role", "img");
    this.plotBox.setAttribute("aria-label", `${title}: no points yet`);
    this.title = title;
    this.empty = document.createElement("p");
    this.empty.className = "muted chart-empty";
    this.empty.textContent = "No points yet.";
    this.plotBox.hidden = true; // until the first point: an empty frame says nothing
    this.figure.append(caption, this.plotBox, this.empty);
    parent.append(this.figure);
    this.series = series;
    this.plot = new uPlot(
      {
        width: widthOf(this.figure),
        height: 220,
        series: [{ label: "step" }, ...series],
        axes,
        scales: Object.assign({ x: { time: false } }, scales || {}),
        legend: { live: true },
        cursor: { drag: { x: false, y: false } },
      },
      [[], ...series.map(() => [])],
      this.plotBox,
    );
    // Follow the figure's width (grid columns, phone rotation, window resizes).
    this.observer = new ResizeObserver(() =>
      requestAnimationFrame(() => {
        const width = widthOf(this.figure);
        if (width !== this.plot.width) this.plot.setSize({ width, height: 220 });
      }),
    );
    this.observer.observe(this.figure);
  }

  setData(data, count, summary) {
    this.plot.setData(data);
    this.figure.dataset.points = String(count);
    this.empty.hidden = count > 0;
    this.plotBox.hidden = count === 0;
    this.plotBox.setAttribute("aria-label", `${this.title}: ${summary}`);
  }

  destroy() {
    this.observer.disconnect();
    this.plot.destroy();
  }
}

function line(label, color, extra = {}) {
  return Object.assign({ label, stroke: color, width: 2, points: { show: false } }, extra);
}

const LR_AXIS = {
  scale: "lr",
  side: 1,
  grid: { show: false },
  size: 70,
  values: (_u, ticks) => ticks.map((t) => t.toExponential(1)),
};

/** The job page's charts; `add(eventData)` takes a metrics event's `data`. */
export class JobCharts {
  constructor(parent) {
    this.parent = parent;
    this.train = new Map(); // step -> {loss, lr, tps}
    this.evals = new Map(); // step -> eval loss
    this.dpo = new Map(); // step -> {margin, accuracy}
    this.loss = new Chart(parent, {
      id: "chart-loss",
      title: "Loss and learning rate per step",
      series: [
        line("train loss", COLORS.loss),
        line("eval loss", COLORS.eval, { spanGaps: true, points: { show: true, size: 7 } }),
        line("learning rate", COLORS.lr, { scale: "lr", dash: [6, 4], width: 1.5 }),
      ],
      axes: [{ label: "step" }, { label: "loss", size: 60 }, { ...LR_AXIS, label: "lr" }],
      scales: { lr: { auto: true } },
    });
    this.speed = new Chart(parent, {
      id: "chart-throughput",
      title: "Throughput (tokens/s)",
      series: [line("tokens/s", COLORS.tps)],
      axes: [{ label: "step" }, { label: "tokens/s", size: 60 }],
    });
    this.dpoChart = null;
    this.pending = false;
  }

  charts() {
    return [this.loss, this.speed, this.dpoChart].filter(Boolean);
  }

  add(data) {
    if (!data || typeof data.step !== "number") return;
    if (typeof data.eval_loss === "number") this.evals.set(data.step, data.eval_loss);
    else if (typeof data.loss === "number") {
      this.train.set(data.step, {
        loss: data.loss,
        lr: typeof data.lr === "number" ? data.lr : null,
        tps: typeof data.tokens_per_second === "number" ? data.tokens_per_second : null,
      });
    }
    // DPO steps carry `reward_margin` and `preference_accuracy` (worker/runner.py); SFT steps
    // have neither (their `mean_token_accuracy` is another figure).
    if (typeof data.eval_loss !== "number") {
      const margin = num(data.reward_margin);
      const accuracy = num(data.preference_accuracy);
      if (margin !== null || accuracy !== null) this.dpo.set(data.step, { margin, accuracy });
    }
    this.schedule();
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  draw() {
    if (this.destroyed) return;
    const steps = [...new Set([...this.train.keys(), ...this.evals.keys()])].sort((a, b) => a - b);
    const loss = steps.map((s) => (this.train.has(s) ? this.train.get(s).loss : null));
    const evals = steps.map((s) => (this.evals.has(s) ? this.evals.get(s) : null));
    const lr = steps.map((s) => (this.train.has(s) ? this.train.get(s).lr : null));
    const lastTrain = [...this.train.entries()].sort((a, b) => a[0] - b[0]).pop();
    const lastEval = [...this.evals.entries()].sort((a, b) => a[0] - b[0]).pop();
    const summary = [
      lastTrain ? `train loss ${lastTrain[1].loss.toFixed(4)} at step ${lastTrain[0]}` : null,
      lastEval ? `eval loss ${lastEval[1].toFixed(4)} at step ${lastEval[0]}` : null,
    ]
      .filter(Boolean)
      .join(", ");
    this.loss.setData([steps, loss, evals, lr], this.train.size, summary || "no points yet");

    const tSteps = [...this.train.keys()].sort((a, b) => a - b);
    const tps = tSteps.map((s) => this.train.get(s).tps);
    const lastTps = tps.length ? tps[tps.length - 1] : null;
    this.speed.setData(
      [tSteps, tps],
      tSteps.length,
      lastTps !== null ? `${Math.round(lastTps)} tokens/s at step ${tSteps.at(-1)}` : "no points",
    );

    if (this.dpo.size) {
      if (!this.dpoChart) {
        this.dpoChart = new Chart(this.parent, {
          id: "chart-dpo",
          title: "DPO reward margin and accuracy",
          series: [
            line("margin", COLORS.margin),
            line("accuracy", COLORS.accuracy, { scale: "acc" }),
          ],
          axes: [
            { label: "step" },
            { label: "margin", size: 60 },
            { scale: "acc", side: 1, grid: { show: false }, label: "accuracy" },
          ],
          scales: { acc: { range: [0, 1] } },
        });
      }
      const dSteps = [...this.dpo.keys()].sort((a, b) => a - b);
      this.dpoChart.setData(
        [
          dSteps,
          dSteps.map((s) => this.dpo.get(s).margin),
          dSteps.map((s) => this.dpo.get(s).accuracy),
        ],
        dSteps.length,
        `${dSteps.length} points`,
      );
    }
  }

  destroy() {
    this.destroyed = true;
    for (const c of this.charts()) c.destroy();
  }
}

function num(v) {
  return typeof v === "number" && Number.isFinite(v) ? v : null;
}
