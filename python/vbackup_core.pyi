"""vbackup's engine for Python: libvirt checkpoint and backup XML, and the per-domain state
machine that decides every QMP command. See README.md for every input and output shape."""

from typing import Any, Optional, Sequence, Union

__version__: str

def validate_xml(text: str) -> list[str]:
    """[] when the document is valid, else one "LINE:COL: PATH: message" per error."""

def format_xml(
    text: str,
    *,
    domain: Optional[str] = None,
    suffix: Optional[str] = None,
    no_domain: bool = False,
    no_size: bool = False,
) -> str:
    """libvirt's canonical form; raises ValueError (one error per line) when invalid."""

class Domain:
    def __init__(
        self,
        definition: Union[str, dict[str, Any]],
        *,
        node_names: Optional[dict[str, Union[str, Sequence[str]]]] = None,
        config: Optional[dict[str, Any]] = None,
        checkpoints: Optional[Sequence[str]] = None,
        current: Optional[str] = None,
        journal: Optional[dict[str, Any]] = None,
        pending_checkpoints: Optional[Sequence[str]] = None,
    ) -> None: ...
    def handle(self, now_ms: int, input: Union[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Feeds one input; returns every output, to carry out in order."""
    def next_deadline(self) -> Optional[int]:
        """When "tick" should next be fed (ms), or None."""
    @property
    def connected(self) -> bool: ...
    @property
    def checkpoints(self) -> list[str]: ...
    @property
    def current_checkpoint(self) -> Optional[str]: ...
    def definition(self) -> dict[str, Any]: ...
    def backup_waiting_for(self) -> Optional[str]: ...
