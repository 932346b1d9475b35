"""The HTML template `dvc plots show` fills: DVC's own page with vega, vega-lite and vega-embed
inlined, so the interactive plots draw on a machine without internet.

DVC's default page loads the three libraries from a CDN (its `{scripts}` placeholder); this
template leaves that placeholder out and inlines the bundle that vl-convert-python ships
(`vl_convert.javascript_bundle()`), generated here rather than committed as minified
JavaScript. `.dvc/config` names the file (`plots.html_template`); the `figures` stage writes
it, and `ikl-pipeline plots-template` rewrites it by hand.
"""
from __future__ import annotations

from pathlib import Path

# DVC replaces these three placeholders (dvc_render.html.HTML); `{scripts}` is deliberately
# absent: it would bring back the CDN <script src=...> tags.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- vega, vega-lite and vega-embed inlined from vl-convert-python VERSION
         (written by `ikl-pipeline plots-template`): the page loads nothing from the network -->
    <script>
(function () {
BUNDLE
})();
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def plots_template() -> str:
    """The template's text: DVC's page layout with the vega libraries inlined.

    The bundle runs inside a function so that its top-level names stay out of the page's
    global scope (it sets window.vega, window.vegaLite and window.vegaEmbed itself)."""
    import vl_convert

    bundle = vl_convert.javascript_bundle()
    # An inline script ends at the first "</script"; the bundle has none today, and this
    # keeps a future one from cutting the page (the JavaScript string is unchanged by it).
    bundle = bundle.replace("</script", "<\\/script")
    version = getattr(vl_convert, "__version__", "unknown")
    return PAGE.replace("VERSION", version).replace("BUNDLE", bundle)


def write_plots_template(path: str | Path) -> Path:
    """Write the template to `path` (its folder created), unless the same text is there."""
    path = Path(path)
    text = plots_template()
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return path
