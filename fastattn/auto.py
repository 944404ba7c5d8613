"""``import fastattn.auto``: the one-line drop-in. Every Transformers model using
"sdpa" attention (the default) runs through fastattn from here on, models already
loaded included. ``fastattn.unpatch()`` undoes it."""
from . import patch
from .integrations import require_transformers

require_transformers("import fastattn.auto")
patch()
