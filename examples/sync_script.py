"""The blocking API, for scripts that are not async.

    python examples/sync_script.py [MODEL.gguf]
"""

import sys
import tempfile
from pathlib import Path

from llamaproc.sync import load_model
from llamaproc.testing import write_tiny_model

with tempfile.TemporaryDirectory() as tmp:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else write_tiny_model(Path(tmp) / "tiny.gguf")
    with load_model(path) as model:
        for tok in model.generate("hello world", max_tokens=24):
            print(tok.text, end="", flush=True)
        print()
        print(model.complete("hello world", max_tokens=8).text)
