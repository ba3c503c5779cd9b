"""The papermill engine the runner executes notebooks with: papermill's own (nbclient), less one stall.

The stall (issue 17). A cell that shows output inside an ipywidgets ``Output`` widget (the explorer's
``display(explorer)``: its constructor draws the first figure into one) can wait for the whole
``execution_timeout`` after it finished, and papermill then reports success. The chain:

1. nbclient mimics a front end for ``Output`` widgets: each output captured by one is sent back to the
   kernel as a ``comm_msg`` (``nbclient.output_widget.OutputWidget.sync_state``), on the *shell* socket,
   while the cell's ``execute_reply`` is awaited on that same socket (``zmq.asyncio`` ``poll(timeout)``).
2. ``jupyter_client.Session.send`` sends through a blocking shadow of that asyncio socket. libzmq handles
   the socket's pending commands inside that send (among them "a message arrived", when the reply has just
   come in) and so consumes the edge of the socket's edge-triggered file descriptor; the shadow does not
   tell pyzmq's asyncio layer, which would have re-read ``zmq.EVENTS`` after a send of its own.
3. The pending ``poll`` waits for an edge that never comes, until its timeout; its last non-blocking check
   then finds the reply, so the cell "succeeds" ``execution_timeout`` seconds late. Without a timeout it
   waits until some other message reaches the shell socket.

It is a race between the widget's send and the reply's arrival: ``stdout_file`` / ``log_output=True`` only
move the timing (the writes happen in the same message loop), which is why they seemed to be the cause;
on this project's 2-core machine the explorer notebook stalled with and without them.

The fix: the engine's ``Output`` widget mimic sends through the asyncio socket itself
(``Session.serialize`` + ``zmq.asyncio.Socket.send_multipart``), whose send re-reads the socket's events
and wakes the pending poll. Everything else is papermill's ``nbclient`` engine.

- :data:`ENGINE_NAME`: pass as ``papermill.execute_notebook(..., engine_name=ENGINE_NAME)`` (registered on
  import of this module).
"""
from __future__ import annotations

import zmq.asyncio
from nbclient.jsonutil import json_clean
from nbclient.output_widget import OutputWidget
from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine, papermill_engines
from papermill.log import logger
from papermill.utils import merge_kwargs, remove_args

__all__ = ["ENGINE_NAME", "AsyncSafeOutputWidget", "SolqNotebookClient", "SolqEngine"]

ENGINE_NAME = "solq"


class AsyncSafeOutputWidget(OutputWidget):
    """nbclient's ``Output`` widget mimic whose comm messages to the kernel go through the asyncio shell socket
    (see the module docstring), so a poll pending on that socket still sees the replies that arrive meanwhile."""

    def _publish_msg(self, msg_type: str, data: dict | None = None, metadata: dict | None = None,
                     buffers: list | None = None, **keys) -> None:
        """Send one comm message (``msg_type``, ``data``, ``metadata``; ``buffers`` ignored, as nbclient does) to
        the kernel on the shell channel. Returns None."""
        socket = self.kernel_client.shell_channel.socket
        if not isinstance(socket, zmq.asyncio.Socket):  # a blocking client has no poll to starve
            super()._publish_msg(msg_type, data, metadata, buffers, **keys)
            return
        session = self.kernel_client.session
        content = json_clean(dict(data=data or {}, comm_id=self.comm_id, **keys))
        msg = session.msg(msg_type, content=content, parent=self.parent_header, metadata=metadata or {})
        # Not awaited (we are called from nbclient's synchronous message handler): the send is tried at once
        # and, when the queue is full, finished by the event loop that is running this handler.
        socket.send_multipart(session.serialize(msg))


class SolqNotebookClient(PapermillNotebookClient):
    """papermill's notebook client with :class:`AsyncSafeOutputWidget` as the ``Output`` widget mimic."""

    def __init__(self, nb_man, km=None, raise_on_iopub_timeout: bool = True, **kw):
        super().__init__(nb_man, km=km, raise_on_iopub_timeout=raise_on_iopub_timeout, **kw)
        self.widget_registry = {**self.widget_registry,
                                "@jupyter-widgets/output": {"OutputModel": AsyncSafeOutputWidget}}


class SolqEngine(NBClientEngine):
    """papermill's ``nbclient`` engine running :class:`SolqNotebookClient`."""

    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None, stderr_file=None,
                                 start_timeout=60, execution_timeout=None, **kwargs):
        """Execute ``nb_man.nb`` in place (papermill's engine interface; the same arguments as papermill's
        nbclient engine). Returns the executed notebook."""
        kwargs = remove_args(["input_path"], **kwargs)
        safe_kwargs = remove_args(["timeout", "startup_timeout"], **kwargs)
        final_kwargs = merge_kwargs(safe_kwargs, timeout=execution_timeout or kwargs.get("timeout"),
                                    startup_timeout=start_timeout, kernel_name=kernel_name, log=logger,
                                    log_output=log_output, stdout_file=stdout_file, stderr_file=stderr_file)
        return SolqNotebookClient(nb_man, **final_kwargs).execute()


papermill_engines.register(ENGINE_NAME, SolqEngine)
