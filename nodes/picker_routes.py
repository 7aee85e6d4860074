"""HTTP routes of the pair picker (web/pso_pair_picker.js talks to these).

- ``POST /pso/picker/pick`` ``{"session": str, "pair": int, "choice": "left"|"right"|"tie"|"skip"}``:
  records one decision (written to disk before the answer); answers the session state.
- ``GET /pso/picker/session/{session}``: a session's state (pairs, image URLs, decisions), for a
  reloaded page.
- ``GET /pso/picker/sessions``: the open sessions (id and node), so a reloaded page finds its own.
- ``GET /pso/picker/dataset?name=<dataset>``: how many pairs and decisions a pair dataset under
  ``output/pso_pairs`` holds.

Every input is validated before anything else happens: bodies are limited to
:data:`MAX_BODY_BYTES` (413), must be a JSON object with exactly the expected keys and types (400),
sessions must be open sessions of this server (404), dataset names must be valid names of existing
datasets under ``output/pso_pairs`` (400 for a name that could leave the folder, 404 for an unknown
one). The only file a route writes is the dataset of the session a pick belongs to, through the
session itself; a refused request writes nothing. Errors are ``{"error": "<what and how to fix>"}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

from ..pso import dataset as pso_dataset
from ..pso import picking
from ..pso.limits import LimitError, loads_json
from . import monitor, pair_picker
from .dataset_nodes import DATASET_ROOT, dataset_path, list_datasets

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4096  # a pick is ~80 bytes
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
PICK_KEYS = ("session", "pair", "choice")
_registered: set[int] = set()


class RouteError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str):
    from aiohttp import web

    return web.json_response({"error": message}, status=status)


def parse_pick(body: bytes) -> tuple[str, int, str]:
    """(session, pair, choice) of a pick request body, or a RouteError naming what is wrong."""
    if len(body) > MAX_BODY_BYTES:
        raise RouteError(413, f"request body is larger than {MAX_BODY_BYTES} bytes; a pick is a small JSON "
                         'object such as {"session": "...", "pair": 0, "choice": "left"}')
    try:
        data = loads_json(body.decode("utf-8"), "the request body", max_depth=2)
    except (UnicodeDecodeError, json.JSONDecodeError, LimitError) as exc:
        raise RouteError(400, f"malformed JSON in the request body ({exc}); send a JSON object such as "
                         '{"session": "...", "pair": 0, "choice": "left"}') from exc
    if not isinstance(data, dict):
        raise RouteError(400, f"the body must be a JSON object with keys {list(PICK_KEYS)}, got "
                         f"{type(data).__name__}")
    if set(data) != set(PICK_KEYS):
        missing, unknown = sorted(set(PICK_KEYS) - set(data)), sorted(set(data) - set(PICK_KEYS))
        raise RouteError(400, f"the body must have exactly the keys {list(PICK_KEYS)}; missing {missing}, "
                         f"unknown {unknown}")
    session, pair, choice = data["session"], data["pair"], data["choice"]
    check_session_id(session)
    if isinstance(pair, bool) or not isinstance(pair, int):
        raise RouteError(400, f"pair must be an integer index, got {pair!r}")
    if not isinstance(choice, str) or choice not in picking.CHOICES:
        raise RouteError(400, f"choice {choice!r} is not one of {list(picking.CHOICES)}")
    return session, pair, choice


def check_session_id(session) -> str:
    if not isinstance(session, str) or not SESSION_ID.match(session):
        raise RouteError(400, f"session {str(session)[:80]!r} is not a session id (8-64 characters of "
                         "letters, digits, '-' and '_')")
    return session


def find_session(session: str) -> pair_picker.PickerSession:
    found = pair_picker.get_session(check_session_id(session))
    if found is None:
        raise RouteError(404, f"no open picking session {session!r}: its node finished or was cancelled, or "
                         "ComfyUI restarted; re-queue the PSO Pick Pairs node to continue")
    return found


def dataset_summary(name) -> dict:
    """Pair and decision counts of an existing dataset; RouteError for bad or unknown names."""
    if not isinstance(name, str) or not name or len(name) > 255:
        raise RouteError(400, "pass the dataset name as ?name=<dataset> (1-255 characters)")
    try:
        folder = dataset_path(name)
    except ValueError as exc:
        raise RouteError(400, str(exc)) from exc
    if not (folder / pso_dataset.MANIFEST_FILE).is_file():
        known = list_datasets()
        raise RouteError(404, f"no pair dataset named {name!r} in output/{DATASET_ROOT} (existing: "
                         f"{known[:20] or 'none'}); PSO Pick Pairs or PSO Save Pairs create one")
    try:
        size = len(pso_dataset.PairDataset.open(folder))
        counts = picking.PickJournal(folder).counts()
    except (pso_dataset.PairDatasetError, picking.PickError) as exc:
        raise RouteError(422, f"dataset {name!r} cannot be read: {exc}") from exc
    return {"name": name, "pairs": size, "decisions": counts}


async def _read_limited(request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise RouteError(413, f"request body of {request.content_length} bytes is larger than "
                         f"{MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    while chunk := await request.content.read(MAX_BODY_BYTES + 1 - size):  # read() may return part of it
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY_BYTES:  # a chunked body without Content-Length: stop reading here
            break
    return b"".join(chunks)


def register(routes) -> bool:
    """Add the routes to the server's RouteTableDef (once per table); True if added now."""
    if id(routes) in _registered:
        return False
    _registered.add(id(routes))

    @routes.post("/pso/picker/pick")
    async def pick(request):
        try:
            session_id, pair, choice = parse_pick(await _read_limited(request))
            session = find_session(session_id)
            loop = asyncio.get_running_loop()
            state = await loop.run_in_executor(None, session.pick, pair, choice)  # disk write off the loop
        except RouteError as exc:
            return _error(exc.status, str(exc))
        except pair_picker.PickRefused as exc:
            return _error(exc.status, str(exc))
        except (OSError, pso_dataset.PairDatasetError, picking.PickError) as exc:
            logger.exception("PSO picker: could not store a decision")
            return _error(500, f"the decision could not be written ({exc}); it was not recorded, try again")
        pair_picker.send_state(session)
        from aiohttp import web

        return web.json_response(state)

    @routes.get("/pso/picker/session/{session}")
    async def session_state(request):
        try:
            session = find_session(request.match_info["session"])
        except RouteError as exc:
            return _error(exc.status, str(exc))
        from aiohttp import web

        return web.json_response(session.state())

    @routes.get("/pso/picker/sessions")
    async def sessions(request):
        from aiohttp import web

        return web.json_response({"sessions": [{"session": s.id, "node": s.node, "dataset": s.dataset_name}
                                               for s in pair_picker.open_sessions()]})

    @routes.get("/pso/picker/dataset")
    async def dataset(request):
        try:
            summary = dataset_summary(request.query.get("name"))
        except RouteError as exc:
            return _error(exc.status, str(exc))
        from aiohttp import web

        return web.json_response(summary)

    return True


def register_with_server() -> bool:
    """Register on the running ComfyUI server, if there is one (not when nodes are imported alone)."""
    instance = monitor.prompt_server()
    if instance is None:
        return False
    return register(instance.routes)
