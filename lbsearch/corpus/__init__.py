"""What the training corpus is made of: sources with weights (:mod:`.sources`, :mod:`.mixture`), the
broad prompt set (:mod:`.prompts`), teacher samples (:mod:`.teacher`), existing text (:mod:`.files`),
held-out real text (:mod:`.realtext`) and per-group splits (:mod:`.splits`).

Imports go one way: ``splits``, ``files``, ``prompts``, ``teacher`` < ``realtext`` < ``sources`` <
``mixture``; :mod:`lbsearch.data` sits above them all. No module here imports pydantic or ``datasets``
at import time (the GPU image has neither).
"""
