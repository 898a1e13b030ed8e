"""The documentation site cannot rot: it builds, its code runs, its links resolve, its API reference is whole.

1. `mkdocs build --strict` (mkdocs.yml at the repository root) succeeds: every warning is an error, including
   mkdocs' own link, anchor and nav validation and mkdocstrings failing to find a documented module.
2. Every ```python block of every docs/**/*.md page and of README.md runs, on the CPU, offline: the blocks of a
   page in order in one fresh namespace, with a fresh temporary working directory per page. All pages run in
   one subprocess (one JAX start-up, compiled code shared between pages; 8 host devices, as tests/conftest.py
   gives the test suite, so the sharding examples run on a real mesh). A block preceded by the line
   `<!-- notest -->` is skipped (GPU-only, network, multi-process or long examples). A failure names the page
   and the line of the markdown file: the blocks are compiled with their real line numbers.
3. Internal links resolve: relative links to pages, `#anchors` (against the heading ids mkdocs generates) and
   image paths, in docs/ and in README.md. External links are not fetched (CI is offline).
4. Every public name the project promises (the copy of shared/API.md below) has an entry in the generated API
   reference, and when that file is beside the repository, the copy is checked against it.

Budget: one mkdocs build (~5 s) plus one subprocess running every page (~30-45 s on 2 cores); pages keep to
the shipped model, tiny random configs and a few generated tokens.
"""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import traceback

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
NOTEST = "<!-- notest -->"
PYTHON_LANGS = ("python", "py")


# ---- markdown parsing (shared by the runner and the tests) -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Block:
    """A fenced code block: its language, its first code line (1-based, in the markdown file) and its code."""

    lang: str
    line: int
    code: str
    skip: bool


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced block of a markdown text, in order. A block is skipped when the last non-blank line before
    its opening fence is `<!-- notest -->`. Indented fences (inside list items) are dedented."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        lang = info.split()[0].lower().lstrip(".{") if info else ""
        prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        body, j = [], i + 1
        while j < len(lines):
            close = lines[j].strip()
            if close.startswith(fence[0] * len(fence)) and set(close) == {fence[0]}:
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        else:
            raise ValueError(f"line {i + 1}: the code fence {fence} is never closed")
        blocks.append(Block(lang, i + 2, "\n".join(body) + "\n", prev == NOTEST))
        i = j + 1
    return blocks


def python_blocks(path: pathlib.Path) -> list[Block]:
    return [b for b in fenced_blocks(path.read_text()) if b.lang in PYTHON_LANGS]


def doc_pages() -> list[pathlib.Path]:
    return sorted(DOCS.rglob("*.md"))


def rel(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


PAGES_WITH_CODE = [p for p in doc_pages() + [README] if python_blocks(p)]


# ---- the runner: `python tests/test_docs.py --run OUT.json PAGE...` (a subprocess of the tests) ------------------

def run_pages(pages: list[str], out: str) -> None:
    """Execute each page's python blocks in order in a fresh namespace and a fresh temporary cwd; write
    `{page: {"error": str | None, "seconds": float, "blocks": int}}` to `out`."""
    results = {}
    for page in pages:
        path = ROOT / page
        namespace = {"__name__": "__docs__"}
        error, ran = None, 0
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="easymamba-docs-") as cwd:
            os.chdir(cwd)
            for block in python_blocks(path):
                if block.skip:
                    continue
                # Padding puts every statement on its markdown line, so tracebacks point into the page.
                code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
                t0 = time.perf_counter()
                try:
                    exec(code, namespace)  # noqa: S102 - the documentation's own examples
                except BaseException:  # noqa: BLE001 - report any failure, SystemExit included
                    tb = traceback.format_exc()
                    error = f"{page}:{block.line}: the python block starting here failed:\n{tb}"
                    break
                ran += 1
                print(f"  {page}:{block.line}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            os.chdir(ROOT)
        results[page] = {"error": error, "seconds": time.perf_counter() - start, "blocks": ran}
        print(f"{page}: {'FAILED' if error else 'ok'} ({ran} blocks, {results[page]['seconds']:.1f} s)",
              file=sys.stderr, flush=True)
        pathlib.Path(out).write_text(json.dumps(results))


# ---- the tests ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def docs_run(tmp_path_factory):
    """Run every page's blocks once, in one subprocess; returns `{page: result}`."""
    out = tmp_path_factory.mktemp("docs-run") / "results.json"
    # Compiling, not running, is what the examples spend their time on: XLA's cheap optimisation level
    # (jax_disable_most_optimizations) cuts that by about a third; results differ only by rounding.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false")
    pages = [rel(p) for p in PAGES_WITH_CODE]
    proc = subprocess.run([sys.executable, __file__, "--run", str(out), *pages], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    results = json.loads(out.read_text()) if out.exists() else {}
    missing = [p for p in pages if p not in results]
    assert not missing, (f"the docs runner stopped (exit {proc.returncode}) before {missing}:\n"
                         f"{proc.stderr[-4000:]}")
    return results


@pytest.mark.parametrize("page", [rel(p) for p in PAGES_WITH_CODE])
def test_python_blocks_run(docs_run, page):
    result = docs_run[page]
    assert result["error"] is None, result["error"]
    assert result["blocks"] >= 1 or all(b.skip for b in python_blocks(ROOT / page))


def test_block_parser_sees_fences_and_notest_marks():
    """The runner's parser against a page made up here: languages, real line numbers, notest, indentation."""
    text = ("# t\n\n```python\na = 1\n```\n\n<!-- notest -->\n```python\nraise SystemExit\n```\n\n"
            "* item\n\n    ```py\n    b = a + 1\n    ```\n\n```bash\nrm -rf /\n```\n")
    blocks = fenced_blocks(text)
    assert [(b.lang, b.line, b.skip) for b in blocks] == [("python", 4, False), ("python", 9, True),
                                                          ("py", 15, False), ("bash", 19, False)]
    assert blocks[2].code == "b = a + 1\n"
    with pytest.raises(ValueError, match="never closed"):
        fenced_blocks("```python\nx = 1\n")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """`mkdocs build --strict` into a temporary directory; returns the directory."""
    site_dir = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return site_dir


def test_mkdocs_build_strict(site):
    assert (site / "index.html").is_file()
    assert (site / "api" / "index.html").is_file()


# ---- 3. internal links ----------------------------------------------------------------------------------------

_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_IMG_TAG = re.compile(r"<img[^>]*\bsrc=\"([^\"]+)\"")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
_ATTR_ID = re.compile(r"\{[^}]*#([\w-]+)[^}]*\}\s*$")


def _strip_code(text: str, inline: bool = True) -> str:
    """The text with fenced blocks blanked (line count kept) and, if `inline`, inline code spans removed
    (headings keep theirs: a heading's code span is part of its id)."""
    out, fence = [], None
    for line in text.splitlines():
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m["fence"]
            out.append("")
        elif fence is not None:
            if line.strip() and set(line.strip()) == {fence[0]} and len(line.strip()) >= len(fence):
                fence = None
            out.append("")
        else:
            out.append(re.sub(r"`[^`\n]*`", "", line) if inline else line)
    return "\n".join(out)


def heading_ids(path: pathlib.Path) -> set[str]:
    """The anchors mkdocs gives a page's headings (Python-Markdown's toc slugify, `_1` for repeats, `{#id}`)."""
    from markdown.extensions.toc import slugify, unique

    ids: set[str] = set()
    for line in _strip_code(path.read_text(), inline=False).splitlines():
        m = _HEADING.match(line)
        if not m:
            continue
        title = m[2]
        attr = _ATTR_ID.search(title)
        if attr:
            ids.add(attr[1])
            continue
        title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)               # links -> their text
        title = re.sub(r"[`*]|(?<!\w)_+|_+(?!\w)", "", title)                # inline markup, not in_word
        unique(slugify(title, "-"), ids)
    return ids


def internal_links(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, target) of every relative link, image and <img src> outside code."""
    found = []
    for number, line in enumerate(_strip_code(path.read_text()).splitlines(), 1):
        for target in _LINK.findall(line) + _IMG_TAG.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):           # http:, https:, mailto:, ...
                continue
            found.append((number, target))
    return found


def broken_links(path: pathlib.Path) -> list[str]:
    """What is wrong with `path`'s internal links: a missing file, a missing heading anchor, an absolute path,
    or (for a page of docs/) a target outside docs/, which the site would not contain."""
    problems = []
    name = rel(path) if path.is_relative_to(ROOT) else path.name
    for number, target in internal_links(path):
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / file_part).resolve()
        where = f"{name}:{number}: link {target!r}"
        if file_part.startswith("/"):
            problems.append(f"{where} is absolute; use a path relative to the page")
        elif not dest.exists():
            problems.append(f"{where}: {dest} does not exist")
        elif path.is_relative_to(DOCS) and not dest.is_relative_to(DOCS):
            problems.append(f"{where} leaves docs/; the site would not have it")
        elif anchor and dest.suffix == ".md" and anchor not in heading_ids(dest):
            problems.append(f"{where}: no heading with id #{anchor} in {dest.name}")
    return problems


def test_internal_links_resolve():
    pages = doc_pages() + [README]
    problems = [p for page in pages for p in broken_links(page)]
    assert not problems, "broken internal links:\n" + "\n".join(problems)
    assert sum(len(internal_links(p)) for p in pages) > 20  # the checker sees the links it is meant to check


def test_link_checker_catches_breakage(tmp_path):
    """The checker itself, on pages made up here: a missing page, a missing anchor and a missing image fail;
    headings with code spans and repeats get mkdocs' ids."""
    (tmp_path / "a.md").write_text("# Top\n\n## The `cache` API\n\n## Top\n\n## Why `in_proj` is **split**\n\n"
                                   "```\n[no](x.md)\n```\n")
    assert heading_ids(tmp_path / "a.md") == {"top", "the-cache-api", "top_1", "why-in_proj-is-split"}
    (tmp_path / "b.md").write_text("[ok](a.md#the-cache-api) [ok](a.md#top_1) ![img](pic.png) [bad](c.md) "
                                   "[bad](a.md#nope) ![bad](gone.png) [ext](https://example.org/x.md) "
                                   "`[code](d.md)`\n")
    (tmp_path / "pic.png").write_bytes(b"")
    problems = broken_links(tmp_path / "b.md")
    assert len(problems) == 3, problems
    assert "c.md" in problems[0] and "#nope" in problems[1] and "gone.png" in problems[2], problems


# ---- 4. the API reference covers the promised surface ------------------------------------------------------------

# Copied from shared/API.md ("the public surface we promise", as of 2026-11-23): CI clones only this
# repository, so the list lives here; `test_api_names_match_shared_api_md` compares it with the file whenever
# shared/ sits beside the repository. `Class.member` names a method, property or field of that class; a name is
# looked up in `easymamba`, then `easymamba.kernels` (`generation.GenerateOutput`: a submodule of `easymamba`).
API_NAMES = (
    # configs
    "Mamba2Config", "Mamba2Config.from_hf", "Mamba2Config.to_hf", "Mamba2Config.intermediate_size",
    "Mamba2Config.conv_dim", "MambaConfig", "MambaConfig.from_hf", "MambaConfig.to_hf",
    "FalconMambaConfig", "FalconMambaConfig.from_hf", "FalconMambaConfig.to_hf",
    "NemotronHConfig", "FalconH1Config", "BambaConfig", "GraniteMoeHybridConfig", "JambaConfig", "Zamba2Config",
    # models
    "Mamba2ForCausalLM", "Mamba2ForCausalLM.init_cache", "Mamba2ForCausalLM.step", "Mamba2Model", "Mamba2Block", "Mamba2Mixer", "RMSNorm",
    "GatedRMSNorm", "MambaForCausalLM", "MambaModel", "MambaBlock", "MambaMixer",
    "FalconMambaForCausalLM", "FalconMambaModel", "FalconMambaBlock", "FalconMambaMixer",
    "NemotronHForCausalLM", "NemotronHModel", "FalconH1ForCausalLM", "FalconH1Model", "BambaForCausalLM",
    "GraniteMoeHybridForCausalLM", "JambaForCausalLM", "Zamba2ForCausalLM", "Attention", "MLP", "MoE",
    "Mamba2CausalLMOutput.logits", "Mamba2CausalLMOutput.cache", "Mamba2CausalLMOutput.loss",
    "Mamba2CausalLMOutput.hidden_states",
    # cache
    "PartitionAxis", "Mamba2CacheMetaData", "Mamba2CacheMetaData.create", "Mamba2CacheMetaData.from_config",
    "Mamba2CacheView", "Mamba2CacheView.init", "Mamba2CacheView.update_conv_state",
    "Mamba2CacheView.update_ssm_state", "Mamba2CacheView.reset", "Mamba2CacheView.conv_states",
    "Mamba2CacheView.ssm_states", "Mamba2CacheView.positions", "Mamba2CacheView.seqlen_offset",
    "Mamba2CacheView.metadata", "Mamba2CacheView.layer_index", "Mamba2CacheView.partition_specs",
    "Mamba2Cache", "Mamba2Cache.views", "Mamba2Cache.init_cache", "Mamba2Cache.init_empty",
    "Mamba2Cache.update_conv_state",
    "Mamba2Cache.update_ssm_state", "Mamba2Cache.update_seq", "Mamba2Cache.reset", "Mamba2Cache.to_dict",
    "Mamba2Cache.from_dict", "Mamba2Cache.to_json", "Mamba2Cache.from_json", "MambaCacheMetaData",
    "MambaCacheView", "MambaCache", "FalconMambaCacheMetaData", "FalconMambaCacheView", "FalconMambaCache",
    "HybridCache", "HybridCacheMetaData", "AttentionCacheView", "AttentionCacheMetaData",
    # kernels
    "ssd", "causal_conv1d", "causal_conv1d_update", "selective_state_update", "ssd_naive",
    # text
    "TextGenerator", "TextGenerator.from_pretrained", "TextGenerator.generate", "TextGenerator.stream",
    "TextGenerator.chat", "TextGenerator.apply_chat_template",
    # Hugging Face's methods on every causal LM
    "Mamba2ForCausalLM.from_pretrained", "Mamba2ForCausalLM.save_pretrained", "Mamba2ForCausalLM.generate",
    "Mamba2ForCausalLM.num_parameters",
    # a compiled forward (model.compile())
    "Mamba2ForCausalLM.compile", "CompiledLM", "CompiledLM.prefill", "CompiledLM.score", "CompiledLM.refresh",
    # generation
    "generate", "GenerationConfig", "generation.GenerateOutput.sequences", "generation.GenerateOutput.cache",
    "generation.GenerateOutput.num_generated",
    # Hugging Face interop
    "from_pretrained", "save_pretrained", "load_state_dict", "state_dict",
    # sharding
    "make_mesh", "shard_model",
    # interpretability
    "run_with_cache", "compute_effective_attention",
)
API_COMMANDS = ("easymamba generate", "easymamba convert")

# API.md writes instance methods on the variable names of its examples; these are their classes.
_API_MD_INSTANCES = {"model": "Mamba2ForCausalLM", "cache": "Mamba2Cache", "view": "Mamba2CacheView",
                     "meta": "Mamba2CacheMetaData", "out": None, "jnp": None, "np": None, "jax": None}


def _resolve(name: str):
    """The object `easymamba.<name>`, else `easymamba.kernels.<name>` (API.md's two homes of public names;
    `Class.member` through the class, a dataclass field as its class), or raise AttributeError."""
    import easymamba
    import easymamba.kernels

    for home in (easymamba, easymamba.kernels):
        obj = home
        try:
            for part in name.split("."):
                if isinstance(obj, type) and part in getattr(obj, "__dataclass_fields__", {}):
                    break                                                # a dataclass field
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise AttributeError(f"neither easymamba nor easymamba.kernels has {name}")


def api_md_names(text: str) -> set[str]:
    """The public names shared/API.md mentions that exist in the installed `easymamba`: calls and
    `Class.member`s in its code blocks (instance variables mapped by `_API_MD_INSTANCES`), `out.field`s, and
    CamelCase names in backticks."""
    import easymamba

    candidates = set()
    code = "\n".join(b.code for b in fenced_blocks(text))
    for base, member in re.findall(r"\b([A-Za-z_]\w*)\.([a-z_]\w*)\b", code):
        cls = base if base[0].isupper() else _API_MD_INSTANCES.get(base, None)
        if cls:
            candidates.add(f"{cls}.{member}")
    candidates.update(re.findall(r"(?<![.\w])([A-Za-z_]\w*)\(", code))
    candidates.update(re.findall(r"`(?:easymamba\.)?([A-Z]\w+)`", text))
    candidates.update(m for m in re.findall(r"`easymamba\.([a-z_]\w*)`", text))
    import easymamba.kernels

    public = set(easymamba.__all__) | set(easymamba.kernels.__all__)
    names = set()
    for name in candidates:
        try:
            _resolve(name)
        except AttributeError:
            continue
        if name.split(".")[0] in public:
            names.add(name)
    return names


def _api_ids(site: pathlib.Path) -> set[str]:
    ids = set()
    for page in (site / "api").rglob("*.html"):
        ids.update(re.findall(r'id="(easymamba\.[\w.]+)"', page.read_text()))
    return ids


def test_api_reference_covers_public_names(site):
    ids = _api_ids(site)
    unresolved = []
    for name in API_NAMES:
        try:
            _resolve(name)
        except AttributeError:
            unresolved.append(name)
    assert not unresolved, f"promised names missing from the easymamba package: {unresolved}"
    missing = [n for n in API_NAMES if not any(i.endswith("." + n) for i in ids)]
    assert not missing, (f"no entry in the API reference (docs/api/) for {missing}; add a ::: directive or the "
                         "member to the page that documents its module")
    cli = (site / "api" / "cli.html").read_text()  # use_directory_urls: false (mkdocs.yml)
    assert all(command in cli for command in API_COMMANDS)


def test_api_names_match_shared_api_md():
    """The copy above against shared/API.md, when it is beside the repository (a developer's checkout or CI's
    clone with shared/ next to it). Names API.md promises that the package does not have are other tests'
    business; names it promises that the package has must be in the copy (and so in the reference)."""
    api_md = ROOT.parent / "shared" / "API.md"
    if not api_md.is_file():
        pytest.skip(f"{api_md} is not beside the repository; the copy in this file is what is checked")
    promised = api_md_names(api_md.read_text())
    assert len(promised) > 30, f"the API.md parser found only {sorted(promised)}"
    missing = sorted(promised - set(API_NAMES))
    assert not missing, f"shared/API.md names {missing}; add them to API_NAMES in tests/test_docs.py"


# ---- benchmark plots ----------------------------------------------------------------------------------------

def test_benchmark_plots_draw_from_committed_results(tmp_path):
    """`benchmarks/plots.py` draws, from the JSON results committed in benchmarks/results/, exactly the figures
    docs/benchmarks.md shows (into a temporary directory: the committed images are the lead's GPU run's)."""
    shown = set(re.findall(r"\]\(images/([\w.-]+\.png)\)", (DOCS / "benchmarks.md").read_text()))
    assert shown, "docs/benchmarks.md shows no plots"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plots.py"), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, MPLBACKEND="Agg"),
                          timeout=300)
    assert proc.returncode == 0, f"benchmarks/plots.py failed:\n{proc.stdout}\n{proc.stderr}"
    drawn = {p.name for p in tmp_path.glob("*.png")}
    assert drawn == shown, f"plots.py drew {sorted(drawn)}; docs/benchmarks.md shows {sorted(shown)}"
    assert all((DOCS / "images" / name).is_file() for name in shown)


# ---- versions -------------------------------------------------------------------------------------------------

def test_version_agrees_everywhere():
    """One version: pyproject.toml, `easymamba.__version__`, `easymamba --version` and CHANGELOG.md's newest
    entry (a `.devN` version is the release it leads to, listed as unreleased)."""
    import easymamba

    pyproject = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert easymamba.__version__ == pyproject
    cli = subprocess.run([sys.executable, "-m", "easymamba.cli", "--version"], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert cli.returncode == 0 and cli.stdout.strip() == f"easymamba {pyproject}", cli
    newest = re.search(r"^## \[(\d[^\]]*)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)[1]
    assert newest == re.sub(r"\.dev\d+$", "", pyproject), (newest, pyproject)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--run":
        run_pages(sys.argv[3:], sys.argv[2])
    else:
        sys.exit("usage: python tests/test_docs.py --run OUT.json PAGE.md ...")
