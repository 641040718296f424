"""Every use of a private name of an upstream library, in one place.

Each entry says which versions it was checked on and why the public API does not do the job, and has a test
in ``tests/test_compat.py`` that fails once upstream changes the name or fixes the problem, so that the
workaround can be deleted instead of silently rotting. Nothing else in ``hf_finetune`` touches an upstream
name that starts with an underscore.
"""

from __future__ import annotations

# --- argparse ---------------------------------------------------------------------------------------------

# --- torch ------------------------------------------------------------------------------------------------

# --- transformers -----------------------------------------------------------------------------------------

# --- accelerate -------------------------------------------------------------------------------------------

# --- huggingface_hub --------------------------------------------------------------------------------------
