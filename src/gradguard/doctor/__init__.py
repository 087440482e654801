"""gradguard doctor: find why gradients explode or vanish, and propose the fix.

``diagnose(model, batch_or_loader, loss_fn, optimizer)`` runs the checks on copies of the
model and optimizer and returns a :class:`Diagnosis` of ranked :class:`Finding` objects.
"""

from .checks import diagnose, diagnose_run
from .findings import Diagnosis, Finding
from .lr_find import LRFindResult, lr_find

__all__ = ["Diagnosis", "Finding", "LRFindResult", "diagnose", "diagnose_run", "lr_find"]
