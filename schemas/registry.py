"""Embedded Confluent-compatible Schema Registry (the REST subset confluent-kafka's client uses).

Production uses a real Confluent Schema Registry; this one exists so that development and the integration
tests need no JVM. Status codes, error codes and JSON shapes follow Confluent's for everything implemented:
errors are `{"error_code": int, "message": str}`; 40401 subject not found, 40402 version not found,
40403 schema not found, 40404/40405 subject (not) soft deleted, 40406/40407 version (not) soft deleted,
40408 no subject-level config, 409 incompatible schema, 42201 invalid schema, 42202 invalid version,
42203 invalid compatibility level.

Only AVRO schemas without references. Schema identity is the canonical form (parsed JSON, attributes
sorted, no whitespace), so reformatting a schema maps to the same id; ids are global across subjects.
State lives in an `AppKey` and is persisted to one JSON file, rewritten atomically (temp file, fsync,
`os.replace`) after every mutation and loaded at startup, so ids survive restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
from aiohttp import web

from schemas.compat import LEVELS, Incompatibility, check_compatibility, validate

__all__ = ["create_registry_app", "run_registry", "serve_registry"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
DEFAULT_LEVEL = "BACKWARD"
MAX_VERSION = 2**31 - 1


class RegistryError(Exception):
    """A Confluent-shaped error: rendered as `{"error_code": ..., "message": ...}` with `status`."""

    def __init__(self, status: int, error_code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except RegistryError as exc:
        return _json({"error_code": exc.error_code, "message": exc.message}, status=exc.status)
    except web.HTTPException as exc:  # unknown route, wrong method: Confluent answers JSON here too
        if exc.status < 400:
            raise
        return _json({"error_code": exc.status, "message": f"HTTP {exc.status} {exc.reason}"}, exc.status)


def _subject_not_found(subject: str) -> RegistryError:
    return RegistryError(404, 40401, f"Subject '{subject}' not found.")


def _version_not_found(version: int | str) -> RegistryError:
    return RegistryError(404, 40402, f"Version {version} not found.")


@dataclass
class Version:
    version: int
    id: int
    deleted: bool = False


@dataclass
class State:
    """The whole registry: schemas by id (canonical text), subjects' versions, compatibility config."""

    path: Path
    schemas: dict[int, str] = field(default_factory=dict)
    subjects: dict[str, list[Version]] = field(default_factory=dict)
    global_level: str = DEFAULT_LEVEL
    subject_levels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> State:
        state = cls(path)
        if path.exists():
            raw = json.loads(path.read_text(encoding="utf-8"))
            state.schemas = {int(k): v for k, v in raw["schemas"].items()}
            state.subjects = {s: [Version(**v) for v in vs] for s, vs in raw["subjects"].items()}
            state.global_level = raw.get("global_level", DEFAULT_LEVEL)
            state.subject_levels = dict(raw.get("subject_levels", {}))
            log.info(
                "schema registry loaded %d schemas, %d subjects from %s",
                len(state.schemas),
                len(state.subjects),
                path,
            )
        return state

    def save(self) -> None:
        data = {
            "schemas": {str(k): v for k, v in self.schemas.items()},
            "subjects": {s: [vars(v) for v in vs] for s, vs in self.subjects.items()},
            "global_level": self.global_level,
            "subject_levels": self.subject_levels,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def versions(self, subject: str, deleted: bool = False) -> list[Version]:
        return [v for v in self.subjects.get(subject, []) if deleted or not v.deleted]

    def level(self, subject: str) -> str:
        return self.subject_levels.get(subject, self.global_level)

    def id_for(self, canonical: str) -> int | None:
        return next((i for i, text in self.schemas.items() if text == canonical), None)

    def lookup(self, subject: str, version: str, deleted: bool = False) -> Version:
        """The version named by `version` (an int or `latest`/-1); raises 42202/40401/40402."""
        number = _parse_version(version)
        candidates = self.versions(subject, deleted)
        if not candidates:
            raise _subject_not_found(subject)
        if number is None:
            return candidates[-1]
        found = next((v for v in candidates if v.version == number), None)
        if found is None:
            raise _version_not_found(number)
        return found


STATE = web.AppKey("schema_registry_state", State)


# --- request helpers ------------------------------------------------------------------------------


def _parse_version(version: str) -> int | None:
    """None means latest."""
    if version == "latest":
        return None
    try:
        number = int(version)
    except ValueError:
        number = 0
    if number == -1:
        return None
    if not 1 <= number <= MAX_VERSION:
        raise RegistryError(
            422,
            42202,
            f"The specified version '{version}' is not a valid version id. "
            'Allowed values are between [1, 2^31-1] and the string "latest"',
        )
    return number


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "false").lower() == "true"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type=CONTENT_TYPE)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(400, 50005, f"Request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RegistryError(422, 422, "Request body must be a JSON object")
    return body


def canonical_schema(text: Any) -> str:
    """The identity of an Avro schema: parsed, validated, attributes sorted, whitespace dropped.

    Raises `RegistryError` 42201 when `text` is not a valid Avro schema.
    """
    if not isinstance(text, str):
        raise RegistryError(422, 42201, "Invalid schema: 'schema' must be a string")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(422, 42201, f"Invalid schema: not JSON: {exc}") from exc
    try:
        fastavro.parse_schema(parsed)
        validate(parsed)  # the names the compatibility checker resolves
    except Exception as exc:  # fastavro raises several unrelated types for bad schemas
        raise RegistryError(422, 42201, f"Invalid schema {text}: {exc}") from exc
    return json.dumps(_unwrap(parsed), sort_keys=True, separators=(",", ":"))


def _unwrap(node: Any) -> Any:
    if isinstance(node, list):
        return [_unwrap(n) for n in node]
    if isinstance(node, dict):
        if set(node) == {"type"} and isinstance(node["type"], str):
            return node["type"]  # {"type": "string"} is "string"
        return {k: _unwrap(v) if k in ("type", "fields", "items", "values") else v for k, v in node.items()}
    return node


def _schema_from_body(body: dict[str, Any]) -> str:
    schema_type = body.get("schemaType") or "AVRO"
    if schema_type != "AVRO":
        raise RegistryError(422, 42201, f"Invalid schema: schema type {schema_type} is not supported")
    if body.get("references"):
        raise RegistryError(422, 42201, "Invalid schema: schema references are not supported")
    return canonical_schema(body.get("schema"))


def _details(found: list[Incompatibility]) -> list[str]:
    return [f"{i.message} (at {i.path})" for i in found]


def _registered(state: State, subject: str, version: Version) -> dict[str, Any]:
    return {
        "subject": subject,
        "version": version.version,
        "id": version.id,
        "schema": state.schemas[version.id],
    }


# --- handlers -------------------------------------------------------------------------------------

routes = web.RouteTableDef()


@routes.get("/")
async def root(request: web.Request) -> web.Response:
    return _json({})


@routes.get("/schemas/types")
async def schema_types(request: web.Request) -> web.Response:
    return _json(["AVRO"])


@routes.get("/subjects")
async def list_subjects(request: web.Request) -> web.Response:
    state = request.app[STATE]
    prefix = request.query.get("subjectPrefix", "")
    deleted_only = _flag(request, "deleted_only")
    deleted = deleted_only or _flag(request, "deleted")
    names = []
    for subject in sorted(state.subjects):
        live = bool(state.versions(subject))
        if subject.startswith(prefix) and state.versions(subject, deleted) and not (deleted_only and live):
            names.append(subject)
    return _json(names)


@routes.post("/subjects/{subject}/versions")
async def register(request: web.Request) -> web.Response:
    state = request.app[STATE]
    subject = request.match_info["subject"]
    canonical = _schema_from_body(await _body(request))
    live = state.versions(subject)
    known_id = state.id_for(canonical)
    for v in live:
        if v.id == known_id:
            return _json({"id": known_id})
    level = state.level(subject)
    found = check_compatibility(json.loads(canonical), [json.loads(state.schemas[v.id]) for v in live], level)
    if found:
        log.info("schema rejected for subject %s (%s): %s", subject, level, _details(found))
        raise RegistryError(
            409,
            409,
            f'Schema being registered is incompatible with an earlier schema for subject "{subject}", '
            f"details: {_details(found)}",
        )
    schema_id = known_id if known_id is not None else max(state.schemas, default=0) + 1
    state.schemas[schema_id] = canonical
    every = state.subjects.setdefault(subject, [])
    version = Version(max((v.version for v in every), default=0) + 1, schema_id)
    every.append(version)
    state.save()
    log.info("registered schema id %d as %s version %d", schema_id, subject, version.version)
    return _json({"id": schema_id})


@routes.post("/subjects/{subject}")
async def lookup(request: web.Request) -> web.Response:
    state = request.app[STATE]
    subject = request.match_info["subject"]
    canonical = _schema_from_body(await _body(request))
    candidates = state.versions(subject, _flag(request, "deleted"))
    if not candidates:
        raise _subject_not_found(subject)
    known_id = state.id_for(canonical)
    match = next((v for v in reversed(candidates) if v.id == known_id), None)
    if match is None:
        raise RegistryError(404, 40403, "Schema not found")
    return _json(_registered(state, subject, match))


@routes.get("/subjects/{subject}/versions")
async def list_versions(request: web.Request) -> web.Response:
    state = request.app[STATE]
    subject = request.match_info["subject"]
    deleted_only = _flag(request, "deleted_only")
    found = state.versions(subject, deleted_only or _flag(request, "deleted"))
    if deleted_only:
        found = [v for v in found if v.deleted]
    if not found:
        raise _subject_not_found(subject)
    return _json([v.version for v in found])


@routes.get("/subjects/{subject}/versions/{version}")
async def get_version(request: web.Request) -> web.Response:
    state = request.app[STATE]
    subject = request.match_info["subject"]
    version = state.lookup(subject, request.match_info["version"], _flag(request, "deleted"))
    return _json(_registered(state, subject, version))


@routes.get("/subjects/{subject}/versions/{version}/schema")
async def get_version_schema(request: web.Request) -> web.Response:
    state = request.app[STATE]
    version = state.lookup(
        request.match_info["subject"], request.match_info["version"], _flag(request, "deleted")
    )
    return web.Response(text=state.schemas[version.id], content_type=CONTENT_TYPE)


@routes.get("/subjects/{subject}/versions/{version}/referencedby")
async def referenced_by(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.lookup(request.match_info["subject"], request.match_info["version"])
    return _json([])  # references are not supported, so nothing refers to anything


@routes.delete("/subjects/{subject}")
async def delete_subject(request: web.Request) -> web.Response:
    state = request.app[STATE]
    subject = request.match_info["subject"]
    every = state.subjects.get(subject)
    if not every:
        raise _subject_not_found(subject)
    live = state.versions(subject)
    if _flag(request, "permanent"):
        if live:
            raise RegistryError(
                404, 40405, f"Subject '{subject}' was not deleted first before being permanently deleted"
            )
        del state.subjects[subject]
        deleted = [v.version for v in every]
    else:
        if not live:
            raise RegistryError(
                404, 40404, f"Subject '{subject}' was soft deleted.Set permanent=true to delete permanently"
            )
        for v in live:
            v.deleted = True
        deleted = [v.version for v in live]
    state.subject_levels.pop(subject, None)
    state.save()
    log.info("deleted subject %s versions %s (permanent=%s)", subject, deleted, _flag(request, "permanent"))
    return _json(deleted)


@routes.delete("/subjects/{subject}/versions/{version}")
async def delete_version(request: web.Request) -> web.Response:
    state = request.app[STATE]
    subject = request.match_info["subject"]
    permanent = _flag(request, "permanent")
    number = _parse_version(request.match_info["version"])
    every = state.subjects.get(subject)
    if not every:
        raise _subject_not_found(subject)
    if number is None:
        live = state.versions(subject)
        if not live:
            raise _subject_not_found(subject)
        number = live[-1].version
    version = next((v for v in every if v.version == number), None)
    if version is None:
        raise _version_not_found(number)
    if permanent:
        if not version.deleted:
            raise RegistryError(
                404,
                40407,
                f"Subject '{subject}' Version {number} was not deleted first "
                "before being permanently deleted",
            )
        every.remove(version)
        if not every:
            del state.subjects[subject]
    else:
        if version.deleted:
            raise RegistryError(
                404,
                40406,
                f"Subject '{subject}' Version {number} was soft deleted.Set "
                "permanent=true to delete permanently",
            )
        version.deleted = True
    state.save()
    log.info("deleted subject %s version %d (permanent=%s)", subject, number, permanent)
    return _json(number)


@routes.get("/schemas/ids/{id}")
async def get_schema(request: web.Request) -> web.Response:
    state = request.app[STATE]
    schema_id = _schema_id(state, request.match_info["id"])
    return _json({"schema": state.schemas[schema_id]})


@routes.get("/schemas/ids/{id}/schema")
async def get_raw_schema(request: web.Request) -> web.Response:
    state = request.app[STATE]
    schema_id = _schema_id(state, request.match_info["id"])
    return web.Response(text=state.schemas[schema_id], content_type=CONTENT_TYPE)


@routes.get("/schemas/ids/{id}/versions")
async def get_schema_versions(request: web.Request) -> web.Response:
    state = request.app[STATE]
    schema_id = _schema_id(state, request.match_info["id"])
    deleted = _flag(request, "deleted")
    return _json(
        [
            {"subject": subject, "version": v.version}
            for subject in sorted(state.subjects)
            for v in state.versions(subject, deleted)
            if v.id == schema_id
        ]
    )


@routes.get("/schemas/ids/{id}/subjects")
async def get_schema_subjects(request: web.Request) -> web.Response:
    state = request.app[STATE]
    schema_id = _schema_id(state, request.match_info["id"])
    deleted = _flag(request, "deleted")
    return _json(sorted({s for s in state.subjects for v in state.versions(s, deleted) if v.id == schema_id}))


def _schema_id(state: State, raw: str) -> int:
    """A schema id still used by some (possibly soft-deleted) version; 40403 otherwise."""
    try:
        schema_id = int(raw)
    except ValueError:
        schema_id = -1
    in_use = any(v.id == schema_id for vs in state.subjects.values() for v in vs)
    if schema_id not in state.schemas or not in_use:
        raise RegistryError(404, 40403, f"Schema {raw} not found")
    return schema_id


@routes.post("/compatibility/subjects/{subject}/versions/{version}")
async def test_compatibility(request: web.Request) -> web.Response:
    state = request.app[STATE]
    subject = request.match_info["subject"]
    canonical = _schema_from_body(await _body(request))
    raw_version = request.match_info["version"]
    if _parse_version(raw_version) is None and not state.versions(subject):
        return _json({"is_compatible": True})  # nothing to be compatible with
    previous = [state.lookup(subject, raw_version)]
    return _compatibility_response(request, state, subject, canonical, previous)


@routes.post("/compatibility/subjects/{subject}/versions")
async def test_compatibility_all(request: web.Request) -> web.Response:
    state = request.app[STATE]
    subject = request.match_info["subject"]
    canonical = _schema_from_body(await _body(request))
    live = state.versions(subject)
    if not state.level(subject).endswith("_TRANSITIVE"):
        live = live[-1:]
    return _compatibility_response(request, state, subject, canonical, live)


def _compatibility_response(
    request: web.Request, state: State, subject: str, canonical: str, previous: list[Version]
) -> web.Response:
    found = check_compatibility(
        json.loads(canonical), [json.loads(state.schemas[v.id]) for v in previous], state.level(subject)
    )
    body: dict[str, Any] = {"is_compatible": not found}
    if _flag(request, "verbose"):
        body["messages"] = _details(found)
    return _json(body)


def _level_from_body(body: dict[str, Any]) -> str:
    level = body.get("compatibility") or body.get("compatibilityLevel")
    if not isinstance(level, str) or level.upper() not in LEVELS:
        raise RegistryError(
            422,
            42203,
            "Invalid compatibility level. Valid values are none, backward, forward, full, "
            "backward_transitive, forward_transitive, and full_transitive",
        )
    return level.upper()


@routes.get("/config")
async def get_global_config(request: web.Request) -> web.Response:
    return _json({"compatibilityLevel": request.app[STATE].global_level})


@routes.put("/config")
async def put_global_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.global_level = _level_from_body(await _body(request))
    state.save()
    return _json({"compatibility": state.global_level})


@routes.delete("/config")
async def delete_global_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    previous, state.global_level = state.global_level, DEFAULT_LEVEL
    state.save()
    return _json({"compatibilityLevel": previous})


@routes.get("/config/{subject}")
async def get_subject_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    subject = request.match_info["subject"]
    if subject in state.subject_levels:
        return _json({"compatibilityLevel": state.subject_levels[subject]})
    if _flag(request, "defaultToGlobal"):
        return _json({"compatibilityLevel": state.global_level})
    raise RegistryError(
        404, 40408, f"Subject '{subject}' does not have subject-level compatibility configured"
    )


@routes.put("/config/{subject}")
async def put_subject_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    level = _level_from_body(await _body(request))
    state.subject_levels[request.match_info["subject"]] = level
    state.save()
    return _json({"compatibility": level})


@routes.delete("/config/{subject}")
async def delete_subject_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    subject = request.match_info["subject"]
    if subject not in state.subject_levels:
        raise _subject_not_found(subject)
    previous = state.subject_levels.pop(subject)
    state.save()
    return _json({"compatibilityLevel": previous})


# --- app and runners ------------------------------------------------------------------------------


def create_registry_app(storage_path: Path) -> web.Application:
    """The registry as an aiohttp application; state is loaded from `storage_path` if it exists.

    Raises `json.JSONDecodeError`/`KeyError` if the file exists but is not a registry state file.
    """
    app = web.Application(middlewares=[_errors])
    app[STATE] = State.load(Path(storage_path))
    app.add_routes(routes)
    return app


async def serve_registry(host: str, port: int, storage_path: Path) -> None:
    """Serve the registry on host:port until cancelled."""
    runner = web.AppRunner(create_registry_app(storage_path))
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("schema registry listening on http://%s:%d (state %s)", host, port, storage_path)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run_registry(host: str, port: int, storage_path: Path) -> None:
    """Blocking CLI entry point: serve until interrupted (Ctrl-C)."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_registry(host, port, storage_path))
