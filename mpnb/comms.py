"""Clicks on a widget while the cell that shows it is still running.

A Cancel click reaches the kernel as a ``comm_msg`` on the shell channel,
which ipykernel reads only between cells.  While a blocking call waits, the
main thread therefore takes the shell messages already waiting for it
(:class:`CommPump`), handles those addressed to the given widgets, and hands
every other one back to the kernel's own handler, in order::

    frontend ── shell channel ──> main shell stream (main_shell_stream)
                                    │  CommPump.pump(), from the waiting caller
                                    ├── comm_msg for our widget ──> widget._handle_msg
                                    └── anything else ────────────> the kernel's handler

This relies on how ipykernel 6 and 7 queue shell messages; with any other
kernel :meth:`CommPump.create` returns ``None`` and clicks wait for the cell
to end.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["CommPump", "main_shell_stream"]


class CommPump:
    """Handle comm messages for our widgets while the main thread is blocked.

    ipykernel reads shell messages (execute requests, completions, comm
    messages) in the main thread's event loop, which does not run while a
    cell waits in ``map``.  :meth:`pump` reads the messages waiting on the
    main thread's shell stream: ``comm_msg`` for one of our widgets is
    handled now, and every other message goes, in arrival order, to the
    handler the kernel registered for it, exactly as the event loop would
    pass it on.  ipykernel 6 reads the shell socket in the main thread; in
    ipykernel 7 a shell-channel thread forwards the main shell's messages
    through an in-process socket pair, whose receiving stream is used instead.
    """

    def __init__(self, stream: Any, session: Any, widgets: dict[str, Any]):
        self._stream = stream
        self._session = session
        self._widgets = widgets

    @classmethod
    def create(cls, kernel: Any, widgets: dict[str, Any]) -> "CommPump | None":
        stream = main_shell_stream(kernel)
        if stream is None or not hasattr(stream, "_recv_callback"):
            return None
        return cls(stream, kernel.session, widgets)

    def pump(self) -> None:
        import zmq

        stream = self._stream
        original, copy = stream._recv_callback, stream._recv_copy
        if original is None or stream.closed():
            return
        stream.on_recv(lambda message: self._route(message, original, copy), copy=copy)
        try:
            stream.flush(zmq.POLLIN)
        finally:
            stream.on_recv(original, copy=copy)

    def _route(self, message: list, original: Callable, copy: bool) -> Any:
        session = self._session
        try:
            idents, frames = session.feed_identities(message, copy=copy)
            peek = session.deserialize(frames, content=False, copy=copy)  # does not record the signature
            widget = None
            if peek["header"]["msg_type"] == "comm_msg":
                widget = self._widgets.get(session.unpack(peek["content"]).get("comm_id"))
        except Exception:
            widget = None
        if widget is None:
            return original(message)  # the kernel's own handler, in order
        widget._handle_msg(session.deserialize(frames, content=True, copy=copy))
        return None


def main_shell_stream(kernel: Any) -> Any:
    """The stream on which the main thread receives shell messages (ipykernel 6 and 7)."""
    try:
        import ipykernel
    except ImportError:
        return None
    major = int(ipykernel.__version__.split(".")[0])
    if major == 7 and getattr(kernel, "shell_channel_thread", None) is not None:
        manager = kernel.shell_channel_thread.manager
        return manager.get_shell_channel_to_subshell_pair(None).to_stream
    if major in (6, 7):
        return getattr(kernel, "shell_stream", None)
    return None
