"""The benchmark plots of docs/benchmarks.md, drawn from the benchmarks' JSON results (never by hand).

    python benchmarks/plots.py                                   # benchmarks/results/*.json -> docs/images/
    python benchmarks/plots.py --ssd A.json --generate B.json C.json --out /tmp/plots

Inputs (written by the benchmark scripts with --out, committed under benchmarks/results/):

    --ssd        one file of benchmarks/ssd.py --lengths ...    -> ssd_vs_length.png
                 (default benchmarks/results/ssd_lengths.json)
    --generate   files of benchmarks/generate.py --prefill-lens -> decode_vs_batch.png, prefill_vs_length.png
                 (default benchmarks/results/generate*.json; their runs are merged, e.g. one file per model
                 shape, and must come from one device)

Every figure names the device, the date and the versions recorded in its JSON, so a plot cannot be read
without knowing where its numbers came from. A result that is missing what a plot needs is an error naming
the file, the field and the command that writes it; `--only` draws a subset.
"""

import argparse
import json
import pathlib
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLOTS = ("ssd", "decode", "prefill")

# implementation key in the JSON -> (legend label, style); easymamba first and solid, peers dashed
SSD_IMPLS = {
    "pallas": ("easymamba (Pallas kernel)", dict(color="C0", marker="o", linestyle="-")),
    "xla": ("easymamba (XLA reference)", dict(color="C0", marker="s", linestyle=":")),
    "mamba_ssm": ("mamba_ssm (Triton)", dict(color="C1", marker="^", linestyle="--")),
    "jla": ("jax-linear-attention", dict(color="C2", marker="v", linestyle="--")),
    "mamba2_jax": ("mamba2-jax", dict(color="C3", marker="D", linestyle="--")),
}
GEN_IMPLS = {
    "easymamba": ("easymamba", dict(color="C0", marker="o", linestyle="-")),
    "transformers": ("transformers (torch)", dict(color="C1", marker="^", linestyle="--")),
    "mamba2_jax": ("mamba2-jax", dict(color="C3", marker="D", linestyle="--")),
}
SHAPE_LABELS = {"130M": "130M (d 768, 24 layers)", "1.3B": "1.3B (d 2048, 48 layers)", "tiny": "tiny (CPU smoke run)"}


class ResultError(ValueError):
    pass


def load(path: pathlib.Path, needed: str, command: str) -> dict:
    if not path.is_file():
        raise ResultError(f"{path} does not exist; write it with `{command}`")
    data = json.loads(path.read_text())
    if needed not in data:
        raise ResultError(f"{path} has no {needed!r}; it must come from `{command}`")
    return data


def provenance(info: dict, width: int) -> str:
    """'device · date' and the versions, wrapped to `width` characters, for a figure's subtitle."""
    versions = info.get("versions") or {"jax": info.get("jax", "?")}
    order = ("easymamba", "jax", "jaxlib", "flax", "torch", "triton", "transformers")
    names = [n for n in order if n in versions] + sorted(n for n in versions if n not in order)
    text = ", ".join(f"{n} {versions[n]}" for n in names)
    return f"{info.get('device', '?')} · {info.get('date', '?')}\n" + textwrap.fill(text, width)


def _figure(plt, n_panels: int, title: str, info: dict):
    width = max(8.0, 6.2 * n_panels)
    fig, axes = plt.subplots(1, n_panels, figsize=(width, 5.0), squeeze=False)
    fig.suptitle(title, fontsize=12, y=0.99)
    fig.text(0.5, 0.925, provenance(info, int(width * 15)), ha="center", va="top", fontsize=7.5, color="0.35")
    return fig, axes[0]


def _finish(fig, path: pathlib.Path, bottom: float = 0.0) -> pathlib.Path:
    fig.tight_layout(rect=(0, bottom, 1, 0.86))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no matplotlib version: stable bytes
    return path


def plt_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def _log_axes(ax, xlabel: str, ylabel: str, xs):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x // 1024}K" if x >= 1024 and x % 1024 == 0 else str(x) for x in xs])
    ticker = plt_ticker()
    ax.xaxis.set_minor_locator(ticker.NullLocator())                   # only the measured lengths
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.10g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)


def plot_ssd(plt, path: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """SSD forward time vs sequence length, each implementation with the floor; and time / floor."""
    data = load(path, "sweep", "python benchmarks/ssd.py --lengths 512,...,16384 --out FILE")
    info, sweep = data["info"], data["sweep"]
    points = sorted(sweep["points"], key=lambda p: p["l"])
    if not points:
        raise ResultError(f"{path}: the sweep has no points")
    s = sweep["shape"]
    title = (f"SSD forward vs sequence length: h{s['h']} p{s['p']} n{s['n']} g{s['g']}, batch {s['b']} "
             f"(bf16 x/B/C/y, float32 state)")
    fig, (ax, ratio) = _figure(plt, 2, title, info)
    ls = [p["l"] for p in points]
    ax.plot(ls, [p["floor"] for p in points], color="black", linestyle="--", linewidth=1.2,
            label="floor: max(bytes / copy bandwidth, FLOPs / matmul rate)")
    for key, (label, style) in SSD_IMPLS.items():
        have = [p for p in points if isinstance(p.get(key), (int, float))]
        if not have:
            continue
        x = [p["l"] for p in have]
        ax.plot(x, [p[key] for p in have], label=label, **style)
        ratio.plot(x, [p[key] / p["floor"] for p in have], label=label, **style)
    _log_axes(ax, "sequence length l", "median time (ms)", ls)
    _log_axes(ratio, "sequence length l", "time / floor", ls)
    ratio.axhline(1.0, color="black", linestyle="--", linewidth=1.2)
    # One legend for both panels, below them: inside the axes it covered the curves it names.
    handles, labels = ax.get_legend_handles_labels()
    rows = -(-len(labels) // 3)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    return _finish(fig, out / "ssd_vs_length.png", bottom=0.045 * rows + 0.02)


def load_generate(paths: list[pathlib.Path], command: str) -> tuple[dict, dict]:
    """(info, {shape: {impl: result}}) merged from generate.py result files, in file and run order."""
    if not paths:
        raise ResultError(f"no generate results given (none in {RESULTS}); write them with `{command}`")
    info, shapes = None, {}
    for path in paths:
        data = load(path, "runs", command)
        if info is None:
            info = data
        elif (data.get("device"), data.get("new_tokens")) != (info.get("device"), info.get("new_tokens")):
            raise ResultError(f"{path} is from {data.get('device')} with {data.get('new_tokens')} new tokens, "
                              f"{paths[0]} from {info.get('device')} with {info.get('new_tokens')}: one plot, "
                              "one setting")
        for key, res in data["runs"].items():
            shape, _, impl = key.partition("/")
            if not impl:
                raise ResultError(f"{path}: run key {key!r} is not 'shape/impl'")
            if impl in shapes.get(shape, {}):
                raise ResultError(f"{path}: {key} is also in an earlier file")
            shapes.setdefault(shape, {})[impl] = res
    if not shapes:
        raise ResultError(f"{', '.join(map(str, paths))}: no runs")
    return info, shapes


def _numbers(mapping: dict) -> list[tuple[int, float]]:
    """Sorted (int key, value) pairs of a JSON dict whose keys are numbers, dropping error strings."""
    return sorted((int(k), float(v)) for k, v in mapping.items() if isinstance(v, (int, float)))


def _skipped_note(ax, notes: list[str]):
    if notes:
        ax.text(0.99, 0.01, "\n".join(notes), transform=ax.transAxes, ha="right", va="bottom", fontsize=6.5,
                color="0.4")


def plot_decode(plt, paths: list[pathlib.Path], out: pathlib.Path) -> pathlib.Path:
    """Decode tokens/s vs batch size, one panel per model shape."""
    info, shapes = load_generate(paths, "python benchmarks/generate.py --batches 1,4,16,64,256 --out FILE")
    title = f"Decode throughput vs batch (greedy, {info.get('new_tokens', '?')} new tokens per row, bf16)"
    fig, axes = _figure(plt, len(shapes), title, info)
    for ax, (shape, impls) in zip(axes, shapes.items()):
        notes, batches = [], set()
        for impl, res in impls.items():
            label, style = GEN_IMPLS.get(impl, (impl, {}))
            pts = _numbers(res.get("decode_tok_s", {}))
            if not pts:
                notes.append(f"{label}: {res.get('skipped', 'no decode numbers')[:70]}")
                continue
            batches.update(b for b, _ in pts)
            ax.plot([b for b, _ in pts], [v for _, v in pts], label=label, **style)
        if batches:
            _log_axes(ax, "batch size b", "tokens / s (batch x new tokens / time)", sorted(batches))
            ax.legend(fontsize=8, loc="upper left")
        ax.set_title(SHAPE_LABELS.get(shape, shape), fontsize=10)
        _skipped_note(ax, notes)
    return _finish(fig, out / "decode_vs_batch.png")


def plot_prefill(plt, paths: list[pathlib.Path], out: pathlib.Path) -> pathlib.Path:
    """Prefill time vs prompt length (batch 1), one panel per model shape."""
    command = "python benchmarks/generate.py --prefill-lens 512,...,16384 --out FILE"
    info, shapes = load_generate(paths, command)
    if not any(res.get("prefill_ms_by_len") for impls in shapes.values() for res in impls.values()):
        raise ResultError(f"{', '.join(map(str, paths))}: no run has prefill_ms_by_len; they must come from "
                          f"`{command}`")
    fig, axes = _figure(plt, len(shapes), "Prefill time vs prompt length (batch 1, bf16, filling the cache)", info)
    for ax, (shape, impls) in zip(axes, shapes.items()):
        notes, lengths = [], set()
        for impl, res in impls.items():
            label, style = GEN_IMPLS.get(impl, (impl, {}))
            by_len = res.get("prefill_ms_by_len") or {}
            pts = _numbers(by_len)
            failed = sorted((int(k), str(v)) for k, v in by_len.items() if not isinstance(v, (int, float)))
            if failed:
                lengths_failed = ", ".join(str(l) for l, _ in failed)
                notes.append(f"{label}: failed at l = {lengths_failed} ({failed[0][1].removeprefix('error: ')[:48]})")
            if not pts:
                if not failed:
                    notes.append(f"{label}: {res.get('skipped', 'not measured')[:70]}")
                continue
            lengths.update(l for l, _ in pts)
            ax.plot([l for l, _ in pts], [v for _, v in pts], label=label, **style)
        if lengths:
            _log_axes(ax, "prompt length l", "median time (ms)", sorted(lengths))
            ax.legend(fontsize=8, loc="upper left")
        ax.set_title(SHAPE_LABELS.get(shape, shape), fontsize=10)
        _skipped_note(ax, notes)
    return _finish(fig, out / "prefill_vs_length.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ssd", type=pathlib.Path, default=RESULTS / "ssd_lengths.json")
    parser.add_argument("--generate", type=pathlib.Path, nargs="+",
                        default=sorted(RESULTS.glob("generate*.json")))
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "images")
    parser.add_argument("--only", default=",".join(PLOTS), help=f"comma-separated subset of {PLOTS}")
    args = parser.parse_args(argv)
    only = [p for p in args.only.split(",") if p]
    unknown = sorted(set(only) - set(PLOTS))
    if unknown:
        parser.error(f"--only names {unknown}; choose from {PLOTS}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    makers = {"ssd": (plot_ssd, args.ssd), "decode": (plot_decode, args.generate),
              "prefill": (plot_prefill, args.generate)}
    try:
        for name in only:
            fn, path = makers[name]
            written = fn(plt, path, args.out)
            plt.close("all")
            sources = ", ".join(map(str, path)) if isinstance(path, list) else str(path)
            print(f"{name}: {sources} -> {written}")
    except ResultError as exc:
        print(f"plots.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
