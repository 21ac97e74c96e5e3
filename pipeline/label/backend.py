"""Label Studio's ML backend protocol over plain callables: what Label Studio sends, what it
expects back, and the model in between. No HTTP server and no Ray here (`pipeline.runtime.serve`
puts this behind Ray Serve); everything runs in a unit test as it is.

What Label Studio 1.23.2 sends (its `ml/api_connector.py`) and reads back:

    GET  /health   -> any JSON with status 2xx ({"status": "UP", ...})
    POST /setup    {project, schema (the labeling config), hostname, access_token, extra_params}
                   -> {"model_version": ...}; an HTTP error marks the backend "Error" in Label Studio
    POST /predict  {tasks: [{id, data: {image: URL}, ...}], project, label_config, params}
                   -> {"results": [one entry per task, in order: a prediction {result, score,
                   model_version}, or a list of them ([] = none for that task)]}
    POST /webhook  {action: ANNOTATION_CREATED | ... | START_TRAINING, ...} -> acknowledged
    POST /train    (the older training call) -> acknowledged

A prediction's `result` holds one brushlabels region per class present: Label Studio's RLE
(`pipeline.io.brush_rle`), the label named as in the project's <BrushLabels>, the image's
original size, and the mean confidence of the class's pixels as the region's score.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from typing import Optional
from urllib.parse import urljoin, urlsplit

import fsspec
import numpy as np
from fsspec.core import split_protocol

from model.errors import DinosegError
from model.storage import options_for
from pipeline.data.decode import Decode, DecodeConfig
from pipeline.data.schema import object_array, set_error, with_error_columns
from pipeline.io.files import bounded_map
from pipeline.io.masks import CONFIDENCE_SCALE
from pipeline.label.exporters import brush_results
from pipeline.options import option
from pipeline.segment.predict import Predict, PredictConfig

log = logging.getLogger(__name__)

TOKEN_ENVS = ("DINOSEG_LABELSTUDIO_TOKEN", "LABEL_STUDIO_API_KEY")  # where the token comes from, in order
URL_ENV = "LABEL_STUDIO_URL"  # Label Studio's URL when --labelstudio-url is not given (as Label Studio's own ML backends read it)
FETCH_TIMEOUT_S = 60  # per task image
READ_THREADS = 8  # task images read at once (they wait on the network)


class BackendError(DinosegError):
    """A request the backend cannot answer (its message says why and what to change)."""


@dataclass(repr=False)  # the repr would show the token
class BackendConfig:
    """`dinoseg serve-labelstudio`'s own options; the model's are segment's (see jobs.serve_labelstudio)."""

    host: str = option("127.0.0.1", "Address to listen on (0.0.0.0: every interface, for Label Studio elsewhere).")
    port: int = option(9090, "Port to listen on: Label Studio's Model settings take http://HOST:PORT.")
    labelstudio_url: Optional[str] = option(
        None, f"Label Studio's URL, for the images it stores (/data/upload/...); default ${URL_ENV}."
    )
    labelstudio_token: Optional[str] = option(
        None,
        f"Label Studio's API token (its legacy token), sent only to --labelstudio-url; default ${TOKEN_ENVS[0]} or "
        f"${TOKEN_ENVS[1]} (better: a command line is visible to other users).",
    )
    replicas: int = option(1, "Serve replicas, each holding the model (one per GPU, say).")
    max_batch_size: int = option(8, "Images from concurrent requests that one model call takes at most.")
    batch_wait_s: float = option(0.05, "How long a replica waits for more images before it runs a batch.")
    # set from segment's options by the command (not options of this class)
    predict: PredictConfig = field(default_factory=PredictConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    gpus_per_replica: Optional[float] = None
    cpus_per_replica: Optional[float] = None
    address: Optional[str] = None

    def __repr__(self) -> str:
        token = "<set>" if self.labelstudio_token else None
        # storage options may hold credentials: their names only
        predict = replace(self.predict, storage_options=sorted(self.predict.storage_options or {}))
        return f"BackendConfig(host={self.host!r}, port={self.port}, labelstudio_url={self.labelstudio_url!r}, token={token}, predict={predict!r})"


@dataclass(frozen=True)
class BrushTarget:
    """Where predictions go in a labeling config: <BrushLabels name=from_name toName=to_name>
    over <Image name=to_name value="$key">, and the BrushLabels' label values."""

    from_name: str
    to_name: str
    key: str  # the task data field holding the image URL
    labels: tuple[str, ...]


def brush_target(label_config: str) -> BrushTarget:
    """The first <BrushLabels> of the config whose toName is an <Image>."""
    hint = "add one whose labels are the model's classes (`dinoseg export --format labelstudio` writes it)"
    try:
        root = ET.fromstring(label_config or "")
    except ET.ParseError as e:
        raise BackendError(f"the project's labeling config is not valid XML ({e}): {hint}.") from None
    tags = list(root.iter())
    images = {el.get("name"): el for el in tags if el.tag.lower() == "image"}
    for el in tags:
        image = images.get(el.get("toName"))
        if el.tag.lower() != "brushlabels" or image is None:
            continue
        value = image.get("value", "")
        if not value.startswith("$"):
            raise BackendError(
                f'<Image name="{image.get("name")}"> takes value="{value}", not a task field: use value="$image".'
            )
        labels = tuple(lb.get("value") for lb in el.iter() if lb.tag.lower() == "label" and lb.get("value"))
        return BrushTarget(el.get("name"), image.get("name"), value[1:], labels)
    raise BackendError(f"the project's labeling config has no <BrushLabels> over an <Image>: {hint}.")


def label_map(target: BrushTarget, classes: tuple[str, ...]) -> dict[int, str]:
    """Class index -> the config's label of the same name (exact, else ignoring case). Classes
    without a label are left out (their pixels get no region); none matching at all is an error."""
    folded = {lb.casefold(): lb for lb in target.labels}
    found = {i: name if name in target.labels else folded.get(name.casefold()) for i, name in enumerate(classes)}
    found = {i: lb for i, lb in found.items() if lb}
    if not found:
        raise BackendError(
            f"none of the model's {len(classes)} classes ({_preview(classes)}) is a label of <BrushLabels "
            f'name="{target.from_name}"> ({_preview(target.labels) or "no labels"}): name the labels as the '
            "model's classes (`dinoseg export --format labelstudio` writes a matching labeling_config.xml)."
        )
    return found


def _preview(names, n: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def model_version(model_id: str, head_checksum: str) -> str:
    """What Label Studio files the predictions under: the model, and which head weights."""
    name = "+".join(part.rsplit("/", 1)[-1] for part in model_id.split("+"))  # a head's file name, not its folder
    return f"dinoseg-{name}-{head_checksum[:8]}" if head_checksum else f"dinoseg-{name}"


# --- task images ----------------------------------------------------------------------------------


def resolve_image_url(url: str, labelstudio_url: str | None) -> tuple[str, bool]:
    """(URL to fetch, whether it is Label Studio's own and gets the token). Label Studio's own
    files are paths on its server (/data/upload/..., /data/local-files/?d=...)."""
    if url.startswith("/") and not url.startswith("//"):
        if not labelstudio_url:
            raise BackendError(
                f"the task's image '{url}' is a file on Label Studio's server: start the backend with "
                f"--labelstudio-url (and Label Studio's API token in ${TOKEN_ENVS[0]})."
            )
        resolved = urljoin(labelstudio_url.rstrip("/") + "/", url.lstrip("/"))
        # a path such as '/https://elsewhere/x.png' joins to another host: it never gets the token
        return resolved, _origin(resolved) == _origin(labelstudio_url)
    if labelstudio_url and _origin(url) == _origin(labelstudio_url):
        return url, True
    return url, False


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def fetch_bytes(url: str, token: str | None = None, storage_options: dict | None = None) -> bytes:
    """The bytes of an image URL: http(s) (with `Authorization: Token` when `token` is given),
    data: URLs, or object storage with `storage_options`. Local paths are refused: a task must not
    make the backend read its host's files."""
    protocol = split_protocol(url)[0] or "file"
    if protocol in ("file", "local"):
        raise BackendError(f"the task's image '{url[:200]}' is a local path: serve it over http(s) or object storage.")
    if protocol in ("http", "https"):
        import aiohttp

        headers = {"Authorization": f"Token {token}"} if token else {}
        client = {"timeout": aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)}
        fs = fsspec.filesystem("http", headers=headers, client_kwargs=client)
    elif protocol == "data":
        fs = fsspec.filesystem("data")
    else:
        fs = fsspec.filesystem(protocol, **options_for(url, storage_options))
    return fs.cat_file(url)


# --- the backend ----------------------------------------------------------------------------------


@dataclass
class PendingPredictions:
    """One /predict request between reading its images and encoding its answer."""

    tasks: list[dict]
    target: BrushTarget
    labels: dict[int, str]
    rows: list[dict]  # one row per task (key = task id), decoded, or failed with an error


class LabelStudioBackend:
    """The protocol's answers, and the model (loaded once, where it is constructed: a Serve
    replica, or a test). `reply` answers everything but /predict, which goes
    `prepare` (read + decode the images) -> `segment` (rows of one or more requests, one model
    batch) -> `finish` (Label Studio's JSON); `predict` does the three in a row."""

    def __init__(self, config: BackendConfig):
        self.config = config
        self.predictor = Predict(replace(config.predict, keep_confidence=True))
        self.decoder = Decode(config.decode)
        segmenter = self.predictor.segmenter
        self.classes = tuple(segmenter.classes.names)
        self.version = model_version(segmenter.model_id, segmenter.head_checksum)

    # --- everything but the model ------------------------------------------------------------

    def reply(self, method: str, path: str, body: dict | None) -> tuple[int, dict] | None:
        """(status, JSON) for a request, or None for POST /predict (see the class)."""
        route = (method.upper(), "/" + path.strip("/"))
        try:
            if route in (("GET", "/"), ("GET", "/health")):
                return 200, {"status": "UP", "model_class": "dinoseg", "model_version": self.version}
            if route == ("POST", "/setup"):
                return 200, self.setup(body or {})
            if route == ("POST", "/predict"):
                return None
            if route in (("POST", "/webhook"), ("POST", "/train")):
                return 200, self.webhook(body or {})
            if route == ("GET", "/versions"):
                return 200, {"versions": [self.version], "model_version": self.version}
            if route == ("GET", "/metrics"):
                return 200, {}
        except BackendError as e:
            log.warning("%s %s: %s", *route, e)
            return 400, {"error": str(e)}
        return 404, {
            "error": f"no {route[0]} {route[1]} here: the ML backend answers /health, /setup, /predict, /webhook."
        }

    def setup(self, body: dict) -> dict:
        target = brush_target(body.get("schema") or body.get("label_config") or "")
        labels = label_map(target, self.classes)
        missing = [c for i, c in enumerate(self.classes) if i not in labels]
        if missing:
            log.warning("classes without a label in the project (never predicted): %s", _preview(missing))
        return {"model_version": self.version}

    def webhook(self, body: dict) -> dict:
        action = body.get("action", "TRAIN")
        message = "acknowledged"
        if action in ("START_TRAINING", "TRAIN"):
            message = "this backend does not train: export the annotations and run `dinoseg train` on them"
        return {"status": "ok", "action": action, "message": message}

    # --- /predict ----------------------------------------------------------------------------

    def prepare(self, body: dict) -> PendingPredictions:
        """Parse the request, then read and decode each task's image (failures become the row's
        error). Raises BackendError for a request no task of which can be answered."""
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
            raise BackendError('the request has no tasks: POST /predict takes {"tasks": [...], "label_config": ...}.')
        target = brush_target(body.get("label_config") or "")
        labels = label_map(target, self.classes)
        n = len(tasks)
        batch = with_error_columns({"path": np.full(n, "", dtype=object), "key": np.full(n, "", dtype=object)})
        data: list = [b""] * n
        wanted = []
        for i, task in enumerate(tasks):
            batch["key"][i] = str(task.get("id", i))
            url = (task.get("data") or {}).get(target.key)
            if not isinstance(url, str) or not url:
                set_error(batch, i, "read", f"task {batch['key'][i]} has no '{target.key}' in its data.")
                continue
            batch["path"][i] = url[:300]  # a data: URL would fill the log
            wanted.append((i, url))
        for (i, url), got in zip(wanted, bounded_map(self._read, [u for _, u in wanted], READ_THREADS), strict=True):
            if isinstance(got, BaseException):  # one task's image costs that task only
                message = f"cannot read task {batch['key'][i]}'s image '{url[:200]}': {got}"
                set_error(batch, i, "read", message, type(got).__name__)
            else:
                data[i] = got
        batch["bytes"] = object_array(data)
        decoded = self.decoder(batch)
        rows = [{k: v[i] for k, v in decoded.items()} for i in range(n)]
        return PendingPredictions(tasks, target, labels, rows)

    def _read(self, url: str) -> bytes | Exception:
        try:
            resolved, own = resolve_image_url(url, self.config.labelstudio_url)
            token = self.config.labelstudio_token if own else None
            return fetch_bytes(resolved, token, self.config.predict.storage_options)
        except Exception as e:  # noqa: BLE001 - becomes the task's error
            return e

    def segment(self, rows: list[dict]) -> list[dict]:
        """Rows (of any requests) through the model as one batch; failed rows pass through."""
        if not rows:
            return []
        batch = {k: object_array([r[k] for r in rows]) for k in rows[0]}
        for k in ("width", "height"):
            batch[k] = np.asarray(batch[k], dtype=np.int64)
        out = self.predictor(batch)
        return [{k: v[i] for k, v in out.items()} for i in range(len(rows))]

    def finish(self, pending: PendingPredictions, rows: list[dict]) -> tuple[int, dict]:
        results: list = []
        errors = []
        for task, row in zip(pending.tasks, rows, strict=True):
            if row["error_stage"]:
                log.warning("task %s: %s", row["key"], row["error_message"])
                errors.append({"task": task.get("id"), "stage": row["error_stage"], "error": row["error_message"]})
                results.append([])  # no prediction for this task; the others keep their places
                continue
            regions, score = brush_regions(row["key"], row["mask"], row["confidence"], pending.labels, pending.target)
            results.append({"result": regions, "score": score, "model_version": self.version})
        answer = {"results": results, "model_version": self.version}
        if errors:
            answer["errors"] = errors
        return 200, answer

    def predict(self, body: dict) -> tuple[int, dict]:
        """POST /predict without batching across requests."""
        try:
            pending = self.prepare(body)
        except BackendError as e:
            log.warning("POST /predict: %s", e)
            return 400, {"error": str(e)}
        return self.finish(pending, self.segment(pending.rows))


def brush_regions(
    key: str, mask: np.ndarray, confidence: np.ndarray, labels: dict[int, str], target: BrushTarget
) -> tuple[list[dict], float]:
    """One brushlabels region per labelled class present (score: the mean confidence of its
    pixels), and the prediction's score: the mean confidence of every labelled pixel."""
    flat = mask.ravel()
    counts = np.bincount(flat)
    sums = np.bincount(flat, weights=confidence.ravel().astype(np.float64) / CONFIDENCE_SCALE)
    regions, pixels, total = [], 0, 0.0
    for c, region in brush_results(mask, key, labels, target.from_name, target.to_name):
        regions.append(region | {"score": round(float(sums[c] / counts[c]), 6)})
        pixels, total = pixels + int(counts[c]), total + float(sums[c])
    return regions, round(total / pixels, 6) if pixels else 0.0
