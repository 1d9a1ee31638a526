"""Local files: the SDK's file:// flow (contract §4), with Ting itself as the upload host.

GET /api/v1/uploads?action=getPolicy hands an authenticated client a policy signed with a server secret;
the form upload (which carries no credentials, as on OSS) is checked against that signature, its expiry,
its key prefix and its size, and the file is bound to the key that asked for the policy. The file is then
usable as oss://<key> in generation requests for 48 hours.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from ting.api.auth import bearer
from ting.api.dashscope.routes import error_response
from ting.api.runtime import Runtime, runtime_of
from ting.api.wire import model_name_problem
from ting.errors import InvalidParameter, UploadRejected

router = APIRouter(tags=["DashScope"])

POLICY_TTL_S = 300
UPLOAD_PATH = "/api/v1/uploads/oss"
FIELD_MAX_BYTES = 64 * 1024  # one form field (the policy is under 1 KiB)
MAX_FIELDS = 20


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@router.get("/api/v1/uploads", summary="Upload certificate for the SDK's file:// flow (action=getPolicy)")
async def get_policy(request: Request, action: str = "", model: str = "") -> JSONResponse:
    if action != "getPolicy":
        raise InvalidParameter("action must be getPolicy.")
    if problem := model_name_problem(model):
        raise InvalidParameter(problem + ".")
    runtime = runtime_of(request)
    who = await runtime.store.keys.authenticate(bearer(request))
    settings = runtime.settings
    now = time.time()
    owner_dir = hashlib.sha256(who.owner.encode()).hexdigest()[:16]
    day = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%d")
    upload_dir = f"dashscope-instant/{owner_dir}/{day}/{uuid.uuid4()}"
    policy = _b64(
        json.dumps(
            {
                "upload_dir": upload_dir,
                "exp": now + POLICY_TTL_S,
                "owner": who.owner,
                "model": model,
                "max_bytes": settings.upload_max_bytes,
            }
        ).encode()
    )
    secret = await runtime.store.secret("upload-policy")
    signature = _b64(hmac.new(secret, policy.encode(), hashlib.sha256).digest())
    base = settings.public_url or str(request.base_url)
    return JSONResponse(
        {
            "request_id": request.state.request_id,
            "data": {
                "policy": policy,
                "signature": signature,
                "upload_dir": upload_dir,
                "upload_host": base.rstrip("/") + UPLOAD_PATH,
                "expire_in_seconds": POLICY_TTL_S,
                "max_file_size_mb": settings.upload_max_bytes // (1024 * 1024),
                "capacity_limit_mb": 999999999,
                "oss_access_key_id": "ting",
                "x_oss_object_acl": "private",
                "x_oss_forbid_overwrite": "true",
            },
        }
    )


@router.post(UPLOAD_PATH, summary="The upload host (an OSS-style form POST, authorised by the signed policy)")
async def upload(request: Request) -> Response:
    """The form is read as it arrives. Its fields come before the file (the SDK's order, and OSS's rule), so the
    policy, signature, key and owner are checked, and an upload slot taken, before a byte of the file is kept.
    A refusal closes the connection instead of reading the rest of the body."""
    runtime = runtime_of(request)
    try:
        await _receive(request, runtime)
    except UploadRejected as exc:
        status, headers, body = error_response(exc, request.state.request_id)
        return Response(body, status_code=status, headers={**headers, "connection": "close"})
    return Response(status_code=200)


async def _receive(request: Request, runtime: Runtime) -> None:
    form = FormStream(request.headers.get("content-type", ""))
    upload: Upload | None = None
    try:
        async for chunk in request.stream():
            form.feed(chunk)
            if form.file_started and upload is None:
                upload = await Upload.start(request, runtime, form.fields)
            if upload is not None:
                await upload.write(form.take_file_bytes())
        if not form.complete or upload is None:
            raise UploadRejected(
                "The body of your POST request is not well-formed multipart/form-data: no file.",
                status=400,
                code="MalformedPOSTRequest",
            )
        await upload.commit()
    finally:
        if upload is not None:
            await upload.discard()


class FormStream:
    """An OSS form POST parsed incrementally (python-multipart's streaming parser): small fields, then one file."""

    def __init__(self, content_type: str) -> None:
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise UploadRejected(
                "The body of your POST request is not well-formed multipart/form-data.",
                status=400,
                code="MalformedPOSTRequest",
            )
        self.fields: dict[str, str] = {}
        self.file_started = False
        self.complete = False
        self._file_bytes: list[bytes] = []
        self._header_name = b""
        self._headers: dict[bytes, bytes] = {}
        self._part: bytearray | None = None  # the field being read
        self._name = ""
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError:
            raise UploadRejected(
                "The body of your POST request is not well-formed multipart/form-data.",
                status=400,
                code="MalformedPOSTRequest",
            ) from None

    def take_file_bytes(self) -> bytes:
        data = b"".join(self._file_bytes)
        self._file_bytes.clear()
        return data

    def _part_begin(self) -> None:
        self._headers, self._header_name = {}, b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        name = self._header_name.lower()
        self._headers[name] = self._headers.get(name, b"") + data[start:end]
        if len(self._headers[name]) > FIELD_MAX_BYTES:
            raise MultipartParseError("header too long")

    def _headers_finished(self) -> None:
        self._header_name = b""
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if self.file_started:
            raise UploadRejected(
                "POST requires exactly one file upload per request.", status=400, code="InvalidArgument"
            )
        if self._name == "file" or b"filename" in options:
            self.file_started = True  # everything after the file is ignored, as on OSS
            self._part = None
        elif len(self.fields) >= MAX_FIELDS:
            raise UploadRejected(
                f"The form has more than {MAX_FIELDS} fields.", status=400, code="MalformedPOSTRequest"
            )
        else:
            self._part = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part is None:
            if self.file_started:
                self._file_bytes.append(data[start:end])
            return
        self._part += data[start:end]
        if len(self._part) > FIELD_MAX_BYTES:
            raise UploadRejected(
                f"Form field {self._name!r} is longer than {FIELD_MAX_BYTES} bytes.",
                status=400,
                code="MalformedPOSTRequest",
            )

    def _part_end(self) -> None:
        if self._part is not None:
            self.fields.setdefault(self._name, self._part.decode("utf-8", "replace"))
            self._part = None

    def _end(self) -> None:
        self.complete = True


class Upload:
    """One authorised upload in progress: its policy, its slot, its temporary file."""

    def __init__(self, runtime: Runtime, policy: dict[str, Any], key: str) -> None:
        self.runtime, self.policy, self.key = runtime, policy, key
        self.temp: Path | None = None
        self._out: Any = None
        self.size = 0
        self._slot = False

    @classmethod
    async def start(cls, request: Request, runtime: Runtime, fields: dict[str, str]) -> Upload:
        policy, key = await _authorise(runtime, fields)
        files = runtime.store.files
        declared = request.headers.get("content-length", "")
        await files.check_room(
            policy["upload_dir"],
            owner=policy["owner"],
            size=int(declared) if declared.isdigit() else 0,
            max_owner_bytes=runtime.settings.upload_quota_bytes,
            max_objects=runtime.settings.max_audio_items,
        )
        upload = cls(runtime, policy, key)
        upload._take_slot()
        try:
            upload.temp = files.temp_path()
            upload._out = await anyio.open_file(upload.temp, "wb")
        except BaseException:
            await upload.discard()
            raise
        return upload

    def _take_slot(self) -> None:
        limit = self.runtime.settings.max_concurrent_uploads
        if self.runtime.uploads_in_flight >= limit:
            raise UploadRejected(
                f"Too many uploads in progress (at most {limit} at once); try again shortly.",
                status=503,
                code="ServiceUnavailable",
            )
        self.runtime.uploads_in_flight += 1
        self._slot = True

    async def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self.size > self.policy["max_bytes"]:
            raise UploadRejected(
                "Your proposed upload exceeds the maximum allowed size.", status=400, code="EntityTooLarge"
            )
        await self._out.write(data)

    async def commit(self) -> None:
        assert self.temp is not None
        await self._out.aclose()
        self._out = None
        if not await self.runtime.store.keys.owner_active(self.policy["owner"]):  # revoked while uploading
            raise _revoked()
        await self.runtime.store.files.commit(
            self.key,
            owner=self.policy["owner"],
            model=self.policy.get("model", ""),
            temp=self.temp,
            size=self.size,
            policy_dir=self.policy["upload_dir"],
            max_owner_bytes=self.runtime.settings.upload_quota_bytes,
            max_objects=self.runtime.settings.max_audio_items,
        )

    async def discard(self) -> None:
        if self._out is not None:
            await self._out.aclose()
            self._out = None
        if self.temp is not None:
            self.temp.unlink(missing_ok=True)
        if self._slot:
            self.runtime.uploads_in_flight -= 1
            self._slot = False


def _revoked() -> UploadRejected:
    return UploadRejected(
        "The OSSAccessKeyId you provided does not exist in our records: the API key that asked "
        "for this policy is no longer valid.",
        code="InvalidAccessKeyId",
    )


async def _authorise(runtime: Runtime, fields: dict[str, str]) -> tuple[dict[str, Any], str]:
    """The signed policy and object key of a form, or UploadRejected. Nothing of the file is read yet."""
    policy_b64 = fields.get("policy", "")
    signature = fields.get("Signature", "")
    key = fields.get("key", "")
    secret = await runtime.store.secret("upload-policy")
    expected = _b64(hmac.new(secret, policy_b64.encode(), hashlib.sha256).digest())
    if not policy_b64 or not hmac.compare_digest(expected.encode(), signature.encode()):
        raise UploadRejected(
            "The request signature we calculated does not match the signature you provided.",
            code="SignatureDoesNotMatch",
        )
    try:
        policy = json.loads(base64.b64decode(policy_b64, validate=True))
    except (binascii.Error, ValueError):
        raise UploadRejected("Invalid Policy: Invalid JSON.", code="InvalidPolicyDocument") from None
    if policy["exp"] < time.time():
        raise UploadRejected("Invalid according to Policy: Policy expired.")
    if (
        not key.startswith(policy["upload_dir"] + "/")
        or len(key) > 1024
        or any(ord(c) < 32 for c in key)
        or key.endswith("/")
    ):
        raise UploadRejected(
            f'Invalid according to Policy: Policy Condition failed: ["starts-with", "$key", "{policy["upload_dir"]}"]'
        )
    if not await runtime.store.keys.owner_active(policy["owner"]):
        raise _revoked()
    return policy, key
