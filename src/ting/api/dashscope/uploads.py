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

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from ting.api.auth import bearer
from ting.api.runtime import runtime_of
from ting.api.wire import model_name_problem
from ting.errors import InvalidParameter, UploadRejected

router = APIRouter(tags=["DashScope"])

POLICY_TTL_S = 300
UPLOAD_PATH = "/api/v1/uploads/oss"
CHUNK = 1024 * 1024


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
    policy = _b64(json.dumps({"upload_dir": upload_dir, "exp": now + POLICY_TTL_S, "owner": who.owner,
                              "model": model, "max_bytes": settings.upload_max_bytes}).encode())
    secret = await runtime.store.secret("upload-policy")
    signature = _b64(hmac.new(secret, policy.encode(), hashlib.sha256).digest())
    base = settings.public_url or str(request.base_url)
    return JSONResponse({"request_id": request.state.request_id, "data": {
        "policy": policy, "signature": signature, "upload_dir": upload_dir,
        "upload_host": base.rstrip("/") + UPLOAD_PATH, "expire_in_seconds": POLICY_TTL_S,
        "max_file_size_mb": settings.upload_max_bytes // (1024 * 1024), "capacity_limit_mb": 999999999,
        "oss_access_key_id": "ting", "x_oss_object_acl": "private", "x_oss_forbid_overwrite": "true",
    }})


@router.post(UPLOAD_PATH, summary="The upload host (an OSS-style form POST, authorised by the signed policy)")
async def upload(request: Request) -> Response:
    runtime = runtime_of(request)
    form = await request.form(max_files=1, max_fields=20, max_part_size=64 * 1024)
    policy_b64 = str(form.get("policy") or "")
    signature = str(form.get("Signature") or "")
    key = str(form.get("key") or "")
    file = form.get("file")
    secret = await runtime.store.secret("upload-policy")
    expected = _b64(hmac.new(secret, policy_b64.encode(), hashlib.sha256).digest())
    if not policy_b64 or not hmac.compare_digest(expected, signature):
        raise UploadRejected("The request signature we calculated does not match the signature you provided.",
                             code="SignatureDoesNotMatch")
    try:
        policy = json.loads(base64.b64decode(policy_b64, validate=True))
    except (binascii.Error, ValueError):
        raise UploadRejected("Invalid Policy: Invalid JSON.", code="InvalidPolicyDocument") from None
    if policy["exp"] < time.time():
        raise UploadRejected("Invalid according to Policy: Policy expired.")
    if not key.startswith(policy["upload_dir"] + "/") or len(key) > 1024 or any(ord(c) < 32 for c in key) \
            or key.endswith("/"):
        raise UploadRejected(f'Invalid according to Policy: Policy Condition failed: ["starts-with", "$key", '
                             f'"{policy["upload_dir"]}"]')
    if not isinstance(file, UploadFile):
        raise UploadRejected("The body of your POST request is not well-formed multipart/form-data: no file.",
                             status=400, code="MalformedPOSTRequest")
    temp = runtime.store.files.temp_path()
    size = 0
    async with await anyio.open_file(temp, "wb") as out:
        while chunk := await file.read(CHUNK):
            size += len(chunk)
            if size > policy["max_bytes"]:
                await out.aclose()
                temp.unlink(missing_ok=True)
                raise UploadRejected("Your proposed upload exceeds the maximum allowed size.", status=400,
                                     code="EntityTooLarge")
            await out.write(chunk)
    await runtime.store.files.commit(key, owner=policy["owner"], model=policy.get("model", ""), temp=temp, size=size)
    return Response(status_code=200)
