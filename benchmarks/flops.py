"""Server FLOPs of ObCLIP against the paper's table, counted from the ops that run.

    python benchmarks/flops.py [--json] [--plot PATH.png] [--n 2 4 6 30] [--exhaustive]
                               [--presets NAME ...] [--config LABEL='{"switch_step": 10, ...}' ...]
                               [--family sd|sdxl|lcm-sdxl]

Every number is counted by ``cloud.flops`` (torch's FlopCounterMode) while
full-size UNets run on the meta device (shapes only, no arithmetic): plain
guided passes for the baselines, and every kind of cloud step of an ObCLIP
plan run through ``cloud.step_modes.run_mode`` in plan order (``cloud.flops.step_flops``). A
step's cost depends only on its ``ModeSpec`` (``cloud.modes.mode_spec``) and
N (and, with ``cross_kv_once``, on which text projections earlier steps left), so
each (configuration, N, spec, projections) cost is counted once, by running that step
of a plan through run_mode after the earlier steps filled its caches, and
reused for the other steps with the same key; steps whose cost is already
known are not run. ``--exhaustive`` runs every cloud step of every plan and
checks that the memo holds.

Two conventions, in T = 1e12:
  MAC(paper)  multiply-adds of convolutions and linears + one of the two
              attention matmuls (= half of all attention-matmul MACs); device
              (BK-SDM) rows count no attention matmul, as the paper does;
  FLOP(all)   2 FLOPs per multiply-add, every convolution and matmul, both
              attention matmuls included, device rows too.
Norms, softmax and elementwise ops are in neither.

``--config`` adds any acceleration setting (an ``AccelerationConfig`` as JSON,
optionally ``LABEL=`` before it): its server cost at every ``--n`` is printed
after the presets and listed under ``configs`` in ``--json``. ``--presets``
with no name leaves the preset tables out.

``--family`` picks a model family at the paper's sizes (``FAMILIES``): SD-v1.4 + BK-SDM at 512 px
(the default), SDXL + Koala-700m at 1024 px (T = 25, the paper presets), LCM-SDXL + Koala-700m at
1024 px (8 steps, the paper's k = 4, r = 2). SDXL-family UNets get their added inputs (pooled text,
size conditioning; LCM's guidance embedding); a guidance-embedding UNet (LCM) runs one row per
prompt, not two. Every row of ``--json`` carries the family.

Only the paper's own numbers (docs/method.md, section 6) are
hard-coded, as references.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field

import torch

from obclip.cloud.flops import FlopBreakdown, FlopCounter, meta_unet, step_flops
from obclip.cloud.modes import mode_spec
from obclip.cloud.step_modes import MissingCacheError, unet_conditioning
from obclip.runtime.conditioning import TIMESTEP_COND
from obclip.runtime.plan import PRESETS, AccelerationConfig, PlannedStep, make_plan

TERA = 1e12

# --- the paper's numbers (docs/method.md), and nothing else ----------------------

# Per UNet pass at 512 px, batch 1, in G MACs, with the convention the paper
# uses for that model: SD-v1.4 "paper" (one attention matmul), BK-SDM
# no attention matmul. BK-SDM-Tiny's is given only as "~0.205 T".
PAPER_PER_PASS_G = {
    "sd-v1.4": ("paper", 370.5),
    "bk-sdm-small": ("no_attention", 217.7),
    "bk-sdm-tiny": ("no_attention", 205.0),
}

# "Server FLOPs (T, MAC convention), SD-v1.4 cloud + BK-SDM-Small device, T=25", by (k, N).
PAPER_TABLE = {
    "cloud_only": {(5, 4): 18.53, (5, 6): 18.53, (10, 4): 18.53, (10, 6): 18.53},
    "hybrid": {(5, 4): 3.71, (5, 6): 3.71, (10, 4): 7.41, (10, 6): 7.41},
    "vanilla_og": {(5, 4): 74.10, (5, 6): 111.15, (10, 4): 74.10, (10, 6): 111.15},
    "obclip": {(5, 4): 14.82, (5, 6): 22.23, (10, 4): 29.64, (10, 6): 44.46},
    "cache": {(5, 4): 12.25, (5, 6): 18.38, (10, 4): 23.36, (10, 6): 35.04},
    "cache_reuse": {(5, 4): 11.13, (5, 6): 16.64, (10, 4): 21.86, (10, 6): 32.72},
    "total:bk-sdm-small": {(5, 4): 19.85, (5, 6): 25.36, (10, 4): 28.40, (10, 6): 39.26},
}
PAPER_T = 25  # the table's T
PAPER_CLOUD, PAPER_DEVICE = "sd-v1.4", "bk-sdm-small"
UNACCELERATED_TOLERANCE = 0.01

# The paper's model families (docs/models.md): cloud, devices, T, and the presets counted (None: every
# named preset of runtime/plan.py). LCM-SDXL: the paper's k = 4, r = 2 over 8 steps; it names no block
# skip point, so s = k (no skip step in the cloud).
FAMILIES = {
    "sd": {"cloud": "sd-v1.4", "devices": ("bk-sdm-small", "bk-sdm-tiny"), "steps": 25, "presets": None},
    "sdxl": {"cloud": "sdxl", "devices": ("koala-700m",), "steps": 25,
             "presets": {name: PRESETS[name] for name in ("paper-k5", "paper-k10")}},
    "lcm-sdxl": {"cloud": "lcm-sdxl", "devices": ("koala-700m",), "steps": 8,
                 "presets": {"lcm-k4-r2": AccelerationConfig(4, 2, 4)}},
}

# The ObCLIP server variants, from a preset: (key, label, config).
VARIANTS = ("obclip", "cache", "cache_reuse", "exact")
VARIANT_LABELS = {
    "obclip": "ObCLIP, no acceleration",
    "cache": "+ cache (attention cache + block skip)",
    "cache_reuse": "+ cache + reuse (paper preset)",
    "exact": "+ exact extras (cross K/V once, step-0 uncond merged)",
}


def variant_config(variant: str, preset: AccelerationConfig, guided: bool = True) -> AccelerationConfig:
    if variant == "obclip":
        return AccelerationConfig.none(preset.switch_step)
    if variant == "cache":
        return preset.replace(batch_reuse=False)
    if variant == "cache_reuse":
        return preset
    if variant == "exact":
        # A guidance-embedding UNet (LCM) has no unconditional rows to merge.
        return preset.replace(cross_kv_once=True, merge_step0_uncond=guided)
    raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")


# --- counting -------------------------------------------------------------------

def _kv_before(config: AccelerationConfig, index: int) -> tuple[bool, ...] | None:
    """With ``cross_kv_once``, which text projections earlier steps left: values, the pivots' keys,
    every text's keys for every module (a pass over the whole UNet), for the modules a block-skip
    step runs. A step projects what it needs and lacks, so its cost depends on them. None without
    the option."""
    if not config.cross_kv_once:
        return None
    values = pivot_keys = keys = skip_keys = False
    for i in range(index):
        spec = mode_spec(config, i)
        if not spec.cross_kv_once:
            continue
        values = True
        if spec.mode.batch_reuse:
            pivot_keys = True
        elif spec.mode.blocks_skipped:
            skip_keys = True
        else:
            keys = True
    return values, pivot_keys or keys, keys, skip_keys


def _cost_flags(config: AccelerationConfig) -> tuple:
    """The parts of a config a step's cost may depend on besides its mode (not k, r, s)."""
    d = config.to_dict()
    for name in ("switch_step", "cache_step", "skip_step"):
        d.pop(name)
    return tuple(sorted(d.items()))


class MemoMismatch(AssertionError):
    pass


@dataclass
class StepCounter:
    """Counts guided steps of named UNets built on the meta device."""

    guidance_scale: float = 7.5
    exhaustive: bool = False
    latent_size: int | None = None                   # latent side counted at; None: each UNet's native size
    unets: dict = field(default_factory=dict)
    plain: dict = field(default_factory=dict)        # (model, n) -> FlopBreakdown of one guided step
    steps: dict = field(default_factory=dict)        # (model, n, flags, spec, kv before) -> FlopBreakdown
    setup: dict = field(default_factory=dict)        # (model, n, flags) -> FlopBreakdown of entering
    passes: int = 0                                  # UNet passes actually run

    def unet(self, name: str):
        if name not in self.unets:
            self.unets[name] = meta_unet(name)
        return self.unets[name]

    def guided(self, name: str) -> bool:
        return unet_conditioning(self.unet(name)).guided

    def _inputs(self, name: str, n: int):
        unet = self.unet(name)
        c = unet.config
        dev = torch.device("meta")
        side = self.latent_size or c.sample_size
        x = torch.empty(n, c.in_channels, side, side, device=dev)
        cond = torch.empty(n, 77, c.cross_attention_dim, device=dev)
        uncond = torch.empty(1, 77, c.cross_attention_dim, device=dev)
        t = torch.tensor(999, device=dev)
        return unet, x, cond, uncond, t

    def _added(self, name: str, rows: int) -> dict:
        """The UNet's added inputs (SDXL family), ``rows`` rows each, on the meta device."""
        widths = unet_conditioning(self.unet(name)).added_widths()
        return {k: torch.empty(rows, w, device=torch.device("meta")) for k, w in widths.items()}

    def plain_step(self, name: str, n: int) -> FlopBreakdown:
        """One classifier-free-guided step of a plain UNet over 2n rows (as cloud.reference.reference_eps);
        n rows for a guidance-embedding UNet (LCM)."""
        key = (name, n)
        if key not in self.plain:
            unet, x, cond, uncond, t = self._inputs(name, n)
            with torch.no_grad(), FlopCounter() as fc:
                if self.guided(name):
                    added = self._added(name, 2 * n)
                    eps = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond.expand(n, -1, -1), cond]),
                               added_cond_kwargs=added).sample
                    e_u, e_c = eps.chunk(2)
                    e_u + self.guidance_scale * (e_c - e_u)
                else:
                    added = self._added(name, n)
                    unet(x, t, encoder_hidden_states=cond, timestep_cond=added.pop(TIMESTEP_COND),
                         added_cond_kwargs=added)
            self.passes += 1
            self.plain[key] = fc.breakdown
        return self.plain[key]

    def _key(self, name, n, config, step: PlannedStep):
        return (name, n, _cost_flags(config), mode_spec(config, step.index, step.mode),
                _kv_before(config, step.index))

    def plan_steps(self, name: str, n: int, config: AccelerationConfig, num_steps: int
                   ) -> tuple[FlopBreakdown, list[tuple[PlannedStep, FlopBreakdown]]]:
        """(setup cost, [(step, cost)] for every cloud step), counted through run_mode (cloud.flops.step_flops)."""
        plan = make_plan(num_steps, config.switch_step, config)
        steps = plan.cloud_steps
        keys = [self._key(name, n, config, s) for s in steps]
        skey = (name, n, _cost_flags(config))
        if self.exhaustive or skey not in self.setup or any(k not in self.steps for k in keys):
            try:
                self._run(name, n, config, steps, keys, skip_known=not self.exhaustive)
            except MissingCacheError:
                # A cache the known (not run) steps would have filled: run them all.
                self._run(name, n, config, steps, keys, skip_known=False)
        return self.setup[skey], [(s, self.steps[k]) for s, k in zip(steps, keys)]

    def _remember(self, table, key, cost: FlopBreakdown, what: str) -> None:
        if key in table and table[key] != cost:
            raise MemoMismatch(f"{what}: counted {cost.flops} FLOPs, an earlier step with the same key "
                               f"{key} counted {table[key].flops}; a step's cost depends on more than its key")
        table.setdefault(key, cost)

    def _run(self, name, n, config, steps, keys, skip_known: bool) -> None:
        from obclip.cloud.step_modes import ModeInputs

        unet, x, cond, uncond, t = self._inputs(name, n)
        with FlopCounter() as fc:   # the request's texts, as the step loop holds them: [empty, candidates]
            text = torch.cat([uncond, cond])
        self._remember(self.setup, (name, n, _cost_flags(config)), fc.breakdown, "request setup")
        inputs = ModeInputs(x=x, timestep=t, text=text, guidance_scale=self.guidance_scale, sizes=(n,),
                            alignment=(None,), added=self._added(name, n + 1))
        known, run = set(self.steps), []   # the steps whose cost is not known yet, up to the last of them
        for i, key in enumerate(keys):
            if skip_known and all(k in known for k in keys[i:]):
                break
            if skip_known and key in known:
                continue
            run.append((steps[i], key))
            known.add(key)
        by_step = {s.index: k for s, k in run}
        for step, cost in step_flops(unet, config, [s for s, _ in run], inputs):
            self.passes += 1
            self._remember(self.steps, by_step[step.index], cost, f"{name} N={n} step {step.index} "
                                                                  f"({step.mode.value})")


# --- the table --------------------------------------------------------------------

@dataclass
class Row:
    key: str
    label: str
    kind: str                      # "unaccelerated" | "accelerated" | "device" | "total"
    paper_macs: float              # in MACs, the paper's convention (device: no attention)
    flops: float                   # 2 per MAC, every matmul
    paper: float | None = None     # the paper's number, T
    family: str = "sd"

    @property
    def ratio(self) -> float | None:
        return None if self.paper is None else (self.paper_macs / TERA) / self.paper

    @property
    def check(self) -> str:
        if self.ratio is None:
            return ""
        if self.kind == "unaccelerated":
            return "ok" if abs(self.ratio - 1) <= UNACCELERATED_TOLERANCE else "OFF"
        return ""

    def to_dict(self) -> dict:
        return {"family": self.family, "key": self.key, "label": self.label, "kind": self.kind,
                "paper_macs_T": self.paper_macs / TERA, "flops_T": self.flops / TERA,
                "paper_T": self.paper, "ratio": self.ratio, "check": self.check or None}


def _paper(key: str, k: int, n: int, cloud: str, device: str | None, num_steps: int) -> float | None:
    if num_steps != PAPER_T or cloud != PAPER_CLOUD:
        return None
    if key.startswith("total:") and key != f"total:{PAPER_DEVICE}":
        return None
    return PAPER_TABLE.get(key, {}).get((k, n))


def _serve(b: FlopBreakdown) -> tuple[float, float]:
    return b.paper_macs, float(b.flops)


def _device(b: FlopBreakdown) -> tuple[float, float]:
    return b.no_attention_macs, float(b.flops)


def compute(cloud: str = "sd-v1.4", devices=("bk-sdm-small", "bk-sdm-tiny"), presets=("paper-k5", "paper-k10"),
            ns=(2, 4, 6, 30), num_steps: int = 25, variants=VARIANTS, exhaustive: bool = False,
            counter: StepCounter | None = None, configs=(), family: str = "sd",
            preset_table: dict[str, AccelerationConfig] | None = None) -> dict:
    """Count everything and lay out the table. Returns a JSON-able dict.

    ``configs``: extra (label, AccelerationConfig) pairs whose server cost is counted at every N.
    ``preset_table``: where the ``presets`` names are looked up (default: runtime/plan.py's PRESETS)."""
    started = time.perf_counter()
    table = PRESETS if preset_table is None else preset_table
    c = counter or StepCounter(exhaustive=exhaustive)
    per_pass = {}
    for name in (cloud, *devices):
        plain1 = c.plain_step(name, 1)  # one guided step = two passes of batch 1 (LCM: one)
        passes = 2 if c.guided(name) else 1
        conv, ref = PAPER_PER_PASS_G.get(name, (None, None))
        ours = getattr(plain1, "paper_macs" if conv != "no_attention" else "no_attention_macs") / passes
        per_pass[name] = {"paper_macs_G": plain1.paper_macs / passes / 1e9,
                          "no_attention_macs_G": plain1.no_attention_macs / passes / 1e9,
                          "all_macs_G": plain1.macs / passes / 1e9, "flops_G": plain1.flops / passes / 1e9,
                          "paper_G": ref, "paper_convention": conv,
                          "ratio": None if ref is None else ours / 1e9 / ref}

    cloud1 = c.plain_step(cloud, 1)
    cfg0 = c.unet(cloud).config
    latent = (cfg0.in_channels, cfg0.sample_size, cfg0.sample_size)
    blocks, per_step, mismatches = [], {}, []
    # Larger k first: its plan meets every mode the smaller one has.
    for pname in sorted(presets, key=lambda p: -table[p].switch_step):
        preset = table[pname]
        k = preset.switch_step
        for n in ns:
            rows = []
            def add(key, label, kind, pair, device=None, rows=rows, k=k, n=n):
                rows.append(Row(key, label, kind, pair[0], pair[1], _paper(key, k, n, cloud, device, num_steps),
                                family))

            add("cloud_only", f"{cloud} cloud only (one image, {num_steps} guided steps)", "unaccelerated",
                _serve(cloud1 * num_steps))
            add("hybrid", f"Hybrid SD (1 prompt, {k} steps on cloud; not private)", "unaccelerated",
                _serve(cloud1 * k))
            server = {}
            steps_out = {}
            for v in variants:
                cfg = variant_config(v, preset, c.guided(cloud))
                setup, costs = c.plan_steps(cloud, n, cfg, num_steps)
                server[v] = setup + sum(b for _, b in costs)
                steps_out[v] = [{"index": s.index, "mode": s.mode.value, "paper_macs": b.paper_macs,
                                 "flops": b.flops} for s, b in costs]
                if v == "obclip":
                    # Vanilla OG: the plain UNet's guided step over 2N rows, all T steps.
                    plain_n = c.plain_step(cloud, n)
                    add("vanilla_og", f"vanilla OG (N candidates, all {num_steps} steps on cloud)",
                        "unaccelerated", _serve(plain_n * num_steps))
                    # A FULL step of the accelerated path must cost what the plain UNet does.
                    for s, b in costs:
                        if b != plain_n:
                            mismatches.append(f"{pname} N={n} step {s.index}: run_mode FULL step "
                                              f"{b.flops} FLOPs != plain UNet {plain_n.flops}")
                add(v, VARIANT_LABELS[v], "unaccelerated" if v == "obclip" else "accelerated", _serve(server[v]))
            per_step.setdefault(pname, {})[n] = steps_out
            base = server.get("cache_reuse")
            for dname in devices:
                dev = c.plain_step(dname, 1) * (num_steps - k)
                add(f"device:{dname}", f"device steps ({num_steps - k} x {dname}, no-attention MACs)", "device",
                    _device(dev), dname)
                if base is not None:
                    add(f"total:{dname}", f"total with device steps (+ cache + reuse, {dname})", "total",
                        (base.paper_macs + dev.no_attention_macs, base.flops + dev.flops), dname)
                if "exact" in server:
                    ex = server["exact"]
                    add(f"total_exact:{dname}", f"total with device steps (+ exact extras, {dname})", "total",
                        (ex.paper_macs + dev.no_attention_macs, ex.flops + dev.flops), dname)
            blocks.append({"preset": pname, "k": k, "r": preset.cache_step, "s": preset.skip_step, "N": n,
                           "rows": [r.to_dict() for r in rows]})
    blocks.sort(key=lambda b: (list(presets).index(b["preset"]), list(ns).index(b["N"])))
    # One entry per named preset and N: its server cost as defined (the preset's own config).
    preset_costs = []
    for pname in presets:
        config = table[pname]
        for n in ns:
            setup, costs = c.plan_steps(cloud, n, config, num_steps)
            server_cost = setup + sum(b for _, b in costs)
            hybrid = cloud1 * config.switch_step
            preset_costs.append({
                "family": family, "preset": pname, "n": n, "k": config.switch_step, "r": config.cache_step,
                "s": config.skip_step, "T": num_steps, "cloud": cloud, "config": config.to_dict(),
                "paper_tmacs": server_cost.paper_macs / 1e12, "tflops": server_cost.flops / 1e12,
                "hybrid_sd_paper_tmacs": hybrid.paper_macs / 1e12,
                "ratio_to_hybrid_sd": server_cost.paper_macs / hybrid.paper_macs})
    config_costs = []
    for label, config in configs:
        for n in ns:
            setup, costs = c.plan_steps(cloud, n, config, num_steps)
            server_cost = setup + sum(b for _, b in costs)
            hybrid = cloud1 * config.switch_step
            config_costs.append({
                "family": family, "label": label, "n": n, "k": config.switch_step, "T": num_steps, "cloud": cloud,
                "config": config.to_dict(), "paper_tmacs": server_cost.paper_macs / 1e12,
                "tflops": server_cost.flops / 1e12, "ratio_to_hybrid_sd": server_cost.paper_macs / hybrid.paper_macs,
                "steps": [{"index": st.index, "mode": st.mode.value, "spec": mode_spec(config, st.index).name,
                           "paper_macs_G": b.paper_macs / 1e9} for st, b in costs]})
    off = [(b["preset"], b["N"], r["key"]) for b in blocks for r in b["rows"] if r["check"] == "OFF"]
    per_pass_off = [name for name, p in per_pass.items()
                    if p["ratio"] is not None and abs(p["ratio"] - 1) > UNACCELERATED_TOLERANCE]
    return {
        "settings": {"family": family, "cloud": cloud, "devices": list(devices), "presets": list(presets),
                     "N": list(ns),
                     "T": num_steps, "latent": "x".join(map(str, latent)), "text_len": 77,
                     "guidance_scale": c.guidance_scale, "exhaustive": c.exhaustive},
        "per_pass": per_pass,
        # Named presets x N: "paper_tmacs" is the server cost in 1e12 multiply-adds, paper convention.
        "presets": preset_costs,
        # --config settings x N, same units.
        "configs": config_costs,
        "blocks": blocks,
        "per_step": per_step,
        # Unaccelerated rows off the paper by more than 1%, and disagreements between code paths.
        "problems": [f"{p} N={n}: {key} off the paper by more than 1%" for p, n, key in off]
                    + [f"per pass: {name} off the paper by more than 1%" for name in per_pass_off] + mismatches,
        "unet_passes_run": c.passes,
        "seconds": time.perf_counter() - started,
    }


# --- output -------------------------------------------------------------------------

def format_table(result: dict) -> str:
    s = result["settings"]
    out = []
    w = out.append
    w(f"ObCLIP server FLOPs ({s.get('family', 'sd')} family): {s['cloud']} cloud, T={s['T']}, latent {s['latent']} "
      f"(x8 px), text {s['text_len']} tokens, classifier-free guidance (2 rows per prompt per step; a "
      "guidance-embedding UNet, LCM: 1)")
    w("  MAC(paper): multiply-adds of conv + linear + ONE attention matmul (= half of all attention-matmul")
    w("              MACs); device (BK-SDM) rows: conv + linear only, the paper's device convention")
    w("  FLOP(all):  2 FLOPs per multiply-add, every conv and matmul, BOTH attention matmuls (device rows too)")
    w("  units: T = 1e12; paper = the table in docs/method.md; ratio = MAC(paper) / paper;"
      f" unaccelerated rows must be within {UNACCELERATED_TOLERANCE:.0%}")
    w("")
    w(f"{'per UNet pass, batch 1':<24} {'MAC(paper) G':>12} {'no-attn G':>10} {'all MAC G':>10} {'FLOP G':>8}"
      f" {'paper G':>8} {'ratio':>6}")
    for name, p in result["per_pass"].items():
        ref = "" if p["paper_G"] is None else f"{p['paper_G']:.1f}" + ("*" if p["paper_convention"] ==
                                                                       "no_attention" else "")
        ratio = "" if p["ratio"] is None else f"{p['ratio']:.4f}"
        w(f"{name:<24} {p['paper_macs_G']:>12.2f} {p['no_attention_macs_G']:>10.2f} {p['all_macs_G']:>10.2f}"
          f" {p['flops_G']:>8.1f} {ref:>8} {ratio:>6}")
    w("  (* paper's number in the no-attention convention, compared with no-attn; bk-sdm-tiny's is '~0.205 T')")
    for b in result["blocks"]:
        w("")
        w(f"== {b['preset']}: k={b['k']} r={b['r']} s={b['s']}, N={b['N']} ==")
        w(f"{'':<56} {'MAC(paper) T':>12} {'FLOP(all) T':>11} {'paper T':>8} {'ratio':>6}")
        for r in b["rows"]:
            paper = "" if r["paper_T"] is None else f"{r['paper_T']:.2f}"
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
            w(f"{r['label']:<56} {r['paper_macs_T']:>12.2f} {r['flops_T']:>11.2f} {paper:>8} {ratio:>6}"
              f" {r['check'] or ''}")
    # Per-step costs (the data of the paper's Figure 12), at the first N with every variant.
    for pname, by_n in result["per_step"].items():
        n = 4 if 4 in by_n else next(iter(by_n))
        steps = by_n[n]
        w("")
        w(f"per cloud step, {pname}, N={n}: MAC(paper) G per guided step (2N rows)")
        w(f"{'step':>4} " + " ".join(f"{v:>22}" for v in steps))
        for i in range(len(next(iter(steps.values())))):
            cells = [f"{steps[v][i]['mode']:>10} {steps[v][i]['paper_macs'] / 1e9:>11.1f}" for v in steps]
            w(f"{i:>4} " + " ".join(cells))
    for cfg in result.get("configs", []):
        w("")
        w(f"== config {cfg['label']}: N={cfg['n']}, T={cfg['T']}: server {cfg['paper_tmacs']:.2f} T MAC(paper), "
          f"{cfg['tflops']:.2f} T FLOP(all), {cfg['ratio_to_hybrid_sd']:.2f}x Hybrid SD ==")
        w(f"   {json.dumps(cfg['config'], sort_keys=True)}")
        w("   " + "  ".join(f"{st['index']}:{st['spec']} {st['paper_macs_G']:.0f}G" for st in cfg["steps"]))
    w("")
    problems = result["problems"]
    w(f"{result['unet_passes_run']} UNet passes counted on the meta device in {result['seconds']:.1f} s; "
      + ("every unaccelerated row within 1% of the paper; FULL steps through run_mode cost what the plain "
         "UNet does" if not problems else "PROBLEMS:\n  " + "\n  ".join(problems)))
    return "\n".join(out)


def plot(result: dict, path: str) -> bool:
    """Per-step FLOPs like the paper's Figure 12. False (and a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed in this environment ({sys.executable}); skipped the plot "
              f"{path}. Install it (pip install matplotlib) to draw it; --json has the same per-step data.",
              file=sys.stderr)
        return False
    presets = list(result["per_step"])
    fig, axes = plt.subplots(1, len(presets), figsize=(6 * len(presets), 4), squeeze=False)
    for ax, pname in zip(axes[0], presets):
        by_n = result["per_step"][pname]
        n = 4 if 4 in by_n else next(iter(by_n))
        for v, steps in by_n[n].items():
            ax.plot([s["index"] for s in steps], [s["paper_macs"] / 1e12 for s in steps], marker="o",
                    label=VARIANT_LABELS[v])
        ax.set_title(f"{pname}, N={n}")
        ax.set_xlabel("cloud step i")
        ax.set_ylabel("T MACs per guided step (paper convention)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def parse_config(text: str) -> tuple[str, AccelerationConfig]:
    """``[LABEL=]JSON`` -> (label, config); the label defaults to the JSON itself."""
    label, sep, body = text.partition("=")
    if not sep or label.lstrip().startswith("{"):
        label, body = text, text
    try:
        d = json.loads(body)
    except ValueError as e:
        raise ValueError(f"--config {text!r} is not JSON: {e}") from None
    return label.strip(), AccelerationConfig.from_dict(d)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.add_argument("--plot", metavar="PATH.png", help="per-step FLOPs plot (needs matplotlib)")
    p.add_argument("--n", type=int, nargs="+", default=[2, 4, 6, 30])
    p.add_argument("--presets", nargs="*", choices=sorted(PRESETS),
                   help="named presets to count (default: the family's, for sd all of them; none: only the "
                        "--config ones)")
    p.add_argument("--config", action="append", default=[], metavar="[LABEL=]JSON",
                   help="an acceleration setting (AccelerationConfig fields as JSON) to count at every --n; "
                        "repeatable")
    p.add_argument("--family", default="sd", choices=sorted(FAMILIES),
                   help="model family at the paper's sizes: its cloud, devices, T and presets (FAMILIES)")
    p.add_argument("--devices", nargs="+", help="device UNets (default: the family's)")
    p.add_argument("--cloud", help="cloud UNet (default: the family's)")
    p.add_argument("--steps", type=int, help="T (default: the family's)")
    p.add_argument("--exhaustive", action="store_true",
                   help="run every cloud step of every plan (slower) and check the per-mode memo")
    args = p.parse_args(argv)
    try:
        configs = [parse_config(text) for text in args.config]
    except ValueError as e:
        p.error(str(e))
    fam = FAMILIES[args.family]
    table = fam["presets"]
    presets = args.presets if args.presets is not None else sorted(table if table is not None else PRESETS)
    if args.presets is not None:
        table = None   # named presets of runtime/plan.py
    result = compute(args.cloud or fam["cloud"], tuple(args.devices or fam["devices"]), tuple(presets),
                     tuple(args.n), args.steps or fam["steps"], exhaustive=args.exhaustive, configs=configs,
                     family=args.family, preset_table=table)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print(format_table(result))
    if args.plot:
        plot(result, args.plot)
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
