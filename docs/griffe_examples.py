"""Griffe extension used by the API pages (mkdocs.yml): render our `Example:` docstring sections as code.

The library titles its doctest section `Example:`, which the Google style reads as a note; `Examples:` is the
section whose `>>>` lines griffe renders as code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe


class ExampleSections(griffe.Extension):
    """Rename `Example:` section titles to `Examples:` in every docstring before it is parsed."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = re.sub(r"^(\s*)Example:$", r"\1Examples:", obj.docstring.value, flags=re.MULTILINE)
