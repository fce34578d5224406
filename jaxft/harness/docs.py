"""docs/results.md from the tables `jaxft table --publish` writes: the prose stays as written, the
generated parts are refreshed in place.

    jaxft table experiments/glue_small.py --grid cpu --seeds 3 --publish   # docs/tables/glue_small/cpu
    jaxft table --docs                                                    # refresh docs/results.md
    python -m jaxft.harness.docs [docs/results.md]                        # the same

In the Markdown file, a generated part sits between two markers naming a published folder
(relative to the Markdown file):

    <!-- jaxft-table tables/glue_small/cpu -->
    ...replaced on every run...
    <!-- /jaxft-table -->

and becomes: the command that reproduces the table, the machine, the date the runs finished (from
table.json), the Markdown table (table.md without its title), and the plots when there are any.
`<!-- jaxft-table tables/adversarial_glue/cpu wide -->` takes the wide form instead (table_wide.md:
a line per row, a column per metric), for tables of many metrics.
Everything outside the markers (the reading of each table) is left alone.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

BEGIN = re.compile(r"^<!-- jaxft-table (?P<folder>\S+)(?P<wide> wide)? -->$", re.M)
END = "<!-- /jaxft-table -->"


def render(folder: pathlib.Path, relative: str, wide: bool = False) -> str:
  """The generated text for one published table folder (paths in it relative to the doc)."""
  md = folder / ("table_wide.md" if wide else "table.md")
  if not md.is_file():
    raise FileNotFoundError(f"{md} not found: publish the table first (jaxft table "
                            "experiments/<x>.py --grid <g> --seeds N --publish)")
  meta_path = folder / "table.json"
  meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
  lines = []
  if meta.get("command"):
    lines.append(f"- command: `{meta['command']}`")
  if meta.get("machine"):
    devices = ", ".join(meta.get("devices", []))
    lines.append(f"- machine: {meta['machine']}" + (f" ({devices})" if devices else ""))
  finished = meta.get("runs_finished") or []
  if finished:
    span = finished[0] if finished[0] == finished[-1] else f"{finished[0]} to {finished[-1]}"
    runs = meta.get("runs", {})
    lines.append(f"- runs finished {span}" + (f" ({runs['finished']} of {runs['planned']} runs)"
                                               if runs else ""))
  table = [line for line in md.read_text().splitlines() if not line.startswith("### ")]
  while table and not table[0].strip():
    table.pop(0)
  body = "\n".join(lines) + ("\n\n" if lines else "") + "\n".join(table).rstrip() + "\n"
  pictures = [f"![{name}]({relative}/{name}.png)" for name in ("bars", "curves")
              if (folder / f"{name}.png").is_file()]
  if pictures:
    body += "\n" + "\n".join(pictures) + "\n"
  return body


def assemble(path: str | pathlib.Path = "docs/results.md") -> list[str]:
  """Refreshes every marked table of the Markdown file in place; returns the folders it filled.
  A marker without its end, or a folder with no published table, fails naming it."""
  path = pathlib.Path(path)
  text = path.read_text()
  out, pos, done = [], 0, []
  for m in BEGIN.finditer(text):
    if m.start() < pos:
      continue
    end = text.find(END, m.end())
    if end < 0:
      raise ValueError(f"{path}: the marker for {m['folder']} has no {END} after it")
    out.append(text[pos:m.end()])
    out.append("\n" + render(path.parent / m["folder"], m["folder"], wide=bool(m["wide"])))
    pos = end
    done.append(m["folder"])
  out.append(text[pos:])
  new = "".join(out)
  if new != text:
    path.write_text(new)
  return done


if __name__ == "__main__":
  target = sys.argv[1] if len(sys.argv) > 1 else "docs/results.md"
  filled = assemble(target)
  print(f"{target}: {len(filled)} table(s) refreshed ({', '.join(filled) or 'none'})")
