"""The documentation against the code: README.md and docs/ link only to files that exist, the
README stays short, docs/store-format.md's reference decoder and tables match a dumped store,
and the page `dvc plots show` writes loads nothing from the network."""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from helpers import params_from, with_changes

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
STORE_FORMAT = ROOT / "docs" / "store-format.md"
README_MAX_LINES = 150

# ---------------------------------------------------------------------------------------------
# Links and length

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(markdown: Path) -> list[str]:
    """Link targets of a Markdown file that are neither URLs nor in-page anchors."""
    text = re.sub(r"```.*?```", "", markdown.read_text(encoding="utf-8"), flags=re.S)
    return [target for target in LINK.findall(text)
            if not re.match(r"[a-z]+:", target) and not target.startswith("#")]


def test_the_docs_folder_has_its_pages():
    names = {path.name for path in DOCS}
    pages = {"pipeline.md", "views-and-seeding.md", "decoding.md", "store.md", "store-format.md",
             "reproducing-the-paper.md", "troubleshooting.md", "your-own-data.md",
             "your-own-teacher.md", "losses.md", "embedded-data.md", "dependencies.md"}
    assert pages <= names
    for name in sorted(pages):  # each opens by saying what its reader will know after it
        opening = (ROOT / "docs" / name).read_text(encoding="utf-8").split("\n\n")[1]
        assert opening.startswith("After this page you"), name


def anchors(markdown: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation but - and _
    dropped, spaces as -."""
    text = re.sub(r"```.*?```", "", markdown.read_text(encoding="utf-8"), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("markdown", [ROOT / "README.md", ROOT / "BENCHMARKS.md", *DOCS],
                         ids=lambda path: path.name)
def test_relative_links_resolve(markdown):
    text = markdown.read_text(encoding="utf-8")
    broken = []
    for target in relative_links(markdown) + [f"#{a}" for a in re.findall(r"\]\(#([^)]+)\)", text)]:
        path, _, anchor = target.partition("#")
        file = markdown.parent / path if path else markdown
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert broken == [], f"{markdown.name}: broken links {broken}"


def test_anchors_follow_githubs_rule(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Losses: `benchmarks/losses.py`\n## Sizing a small data set\n")
    assert anchors(page) == {"losses-benchmarkslossespy", "sizing-a-small-data-set"}


def test_the_link_finder_finds_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](docs/x.md) [b](https://x.org) [c](#here) [d](y.md#part)\n"
                    "```\n[e](not/a/link.md)\n```\n")
    assert relative_links(page) == ["docs/x.md", "y.md#part"]


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines"


# ---------------------------------------------------------------------------------------------
# docs/store-format.md against a dumped store

def reference_decoder(tmp_path: Path):
    """The `teacher_logits` function of store-format.md's "Reference decoder" section, loaded
    from the page's Python block as a module."""
    text = STORE_FORMAT.read_text(encoding="utf-8")
    section = text[text.index("## Reference decoder"):]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    module_path = tmp_path / "store_format_decoder.py"
    module_path.write_text(code)
    spec = importlib.util.spec_from_file_location("store_format_decoder", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.teacher_logits


@pytest.fixture(scope="module")
def dumped_stores(stage_one_data, teacher_checkpoint, tmp_path_factory):  # noqa: F811
    """The toy teacher dumped three ways: k < C with the quantised tail, k < C without it,
    k = C. name -> store path."""
    from pipeline.store.dump import dump_logits

    root = tmp_path_factory.mktemp("docs_stores")
    settings = {"quantized": dict(tail="quantized"), "none": dict(tail="none"),
                "all": dict(tail="none", topk=3)}
    stores = {}
    for name, changes in settings.items():
        params = params_from(with_changes(stage_one_data.raw, "logits", **changes))
        path = root / f"{name}.zarr"
        dump_logits(params, "teacher", str(stage_one_data.shards_dir), str(teacher_checkpoint),
                    str(path))
        stores[name] = str(path)
    return stores


@pytest.mark.parametrize("name", ["quantized", "none", "all"])
def test_the_reference_decoder_gives_the_readers_logits(dumped_stores, name, tmp_path):
    from pipeline.store import open_store

    decode = reference_decoder(tmp_path)
    store = open_store(dumped_stores[name])
    assert store.num_shards > 1  # ranges below cross shard boundaries
    for view in range(store.views):
        for start, stop in [(0, store.rows), (store.shard_rows - 1, store.shard_rows + 2)]:
            expected = store.teacher_logits(view, start, stop)  # (n, C) float32
            decoded = decode(dumped_stores[name], view, start, stop)
            assert decoded.shape == expected.shape and decoded.dtype == np.float32
            # the same arithmetic in numpy instead of torch: float32 rounding apart
            np.testing.assert_allclose(decoded, expected, rtol=0, atol=1e-4)
            top = np.argsort(-expected, axis=1, kind="stable")[:, :store.topk]
            np.testing.assert_array_equal(  # the top-k exactly
                np.take_along_axis(decoded, top, 1), np.take_along_axis(expected, top, 1))


def table_names(heading: str, stop: str = "\n## ") -> dict[str, str]:
    """First-column names (in backticks) of the Markdown tables between `heading` and the
    next `stop` in store-format.md -> the row's second cell."""
    text = STORE_FORMAT.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    section = section[:section.index(stop, 1)]
    names = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 1 and not set(cells[0]) <= set("-"):
            for name in re.findall(r"`([^`]+)`", cells[0]):
                names[name] = cells[1]
    return names


def store_arrays(path: str) -> dict[str, zarr.Array]:
    """Every array of a store, nested ones by their path (class_prior/T=1.0)."""
    group = zarr.open_group(path, mode="r")
    arrays = dict(group.arrays())
    for group_name, subgroup in group.groups():
        arrays.update({f"{group_name}/{name}": array for name, array in subgroup.arrays()})
    return arrays


def test_the_specification_lists_every_array_with_its_dtype_and_chunks(dumped_stores):
    view_rows = table_names("## Arrays indexed (view, row, ...)")
    others = table_names("## Other arrays")
    documented = {**view_rows, **others}
    for name in dumped_stores:
        arrays = store_arrays(dumped_stores[name])
        attrs = zarr.open_group(dumped_stores[name], mode="r").attrs
        views, shard_rows = attrs["views"], attrs["shard_rows"]
        for array_name, array in arrays.items():
            key = re.sub(r"^class_prior/T=.*", "class_prior/T=<t>", array_name)
            assert key in documented, f"{array_name} is not in store-format.md"
            assert str(array.dtype) in documented[key], (array_name, array.dtype)
            if key in view_rows:  # one shard per WebDataset shard, one inner chunk per view
                assert array.shards == (views, shard_rows, *array.shape[2:]), array_name
                assert array.chunks == (1, shard_rows, *array.shape[2:]), array_name
            else:
                assert array.shards is None, array_name
        present = {re.sub(r"^class_prior/T=.*", "class_prior/T=<t>", a) for a in arrays}
        missing = set(documented) - present
        if name == "quantized":  # the store with every kind of array
            assert missing == set(), f"store-format.md lists arrays a store lacks: {missing}"


def test_the_specification_lists_every_attribute(dumped_stores):
    documented = set(table_names("## Attributes", stop="The keys of `encoding`"))
    encoding_keys = {key for key in table_names("The keys of `encoding`")}
    for path in dumped_stores.values():
        attrs = dict(zarr.open_group(path, mode="r").attrs)
        assert set(attrs) <= documented, f"undocumented: {set(attrs) - documented}"
        assert set(attrs["encoding"]) == encoding_keys
    quantized = dict(zarr.open_group(dumped_stores["quantized"], mode="r").attrs)
    # decode_device is recorded by the gpu decode path only (not run on this CPU)
    assert documented - set(quantized) == {"decode_device"}


# ---------------------------------------------------------------------------------------------
# `dvc plots show` offline

# What makes a browser fetch: a src/href attribute, a CSS url() or @import, with a scheme or a
# protocol-relative //host. Strings inside scripts (a spec's "$schema", the "open in editor"
# link vega-embed builds on a click) fetch nothing and are not matched.
REMOTE = re.compile(r"""(?:\b(?:src|href)\s*=\s*["']?|url\(\s*["']?|@import\s+["']?)"""
                    r"""(?:[a-z][a-z0-9+.-]*:)?//""", re.I)


def remote_references(page: str) -> list[str]:
    return [page[match.start():match.end() + 40] for match in REMOTE.finditer(page)]


def test_the_remote_reference_finder_finds_dvcs_cdn_scripts():
    from dvc_render.html import PAGE_HTML
    from dvc_render.vega import VegaRenderer

    default_page = PAGE_HTML.replace("{scripts}", VegaRenderer.SCRIPTS)
    assert len(remote_references(default_page)) == 3  # vega, vega-lite, vega-embed
    assert remote_references('<img src="static/a.png"><a href="#x">') == []
    assert remote_references("<link href='//cdn.example/x.css'>") != []


def test_dvc_plots_show_writes_a_page_that_loads_nothing_remote(tmp_path):
    """`dvc plots show` in a copy of the repository's plot definitions and committed results,
    with its .dvc/config and the template the figures stage writes."""
    from pipeline.tools.cli import PLOTS_TEMPLATE
    from pipeline.tools.plots_template import write_plots_template

    repo = tmp_path / "repo"
    repo.mkdir()
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=repo, check=True)
    for name in ("dvc.yaml", "params.yaml", "results", "figures", ".dvc/config"):
        source, target = ROOT / name, repo / name
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy(source, target)
    config_path = subprocess.run([*dvc, "config", "plots.html_template"], cwd=repo, check=True,
                                 capture_output=True, text=True).stdout.strip()
    assert Path(".dvc", config_path) == Path(PLOTS_TEMPLATE)  # the file the figures stage writes
    assert f"--plots-template {PLOTS_TEMPLATE}" in (ROOT / "dvc.yaml").read_text()
    write_plots_template(repo / PLOTS_TEMPLATE)
    subprocess.run([*dvc, "plots", "show", "-o", "out"], cwd=repo, check=True,
                   capture_output=True, text=True, timeout=300)
    page = (repo / "out" / "index.html").read_text(encoding="utf-8")
    assert remote_references(page) == []
    assert "window.vegaEmbed=" in page.replace(" ", "")  # the libraries are in the page
    assert page.count("vegaEmbed('#") + page.count('vegaEmbed("#') >= 3  # interactive plots
    assert '<img src="static/' in page or "<img src='static/" in page  # and the PNGs
