"""One exception tree for everything that can go wrong in Ting.

Errors are raised, never returned. Each class knows its HTTP status and its DashScope code and message
(docs: dashscope-contract.md §3.2); each wire protocol renders its own envelope from those.

* TingError
  + BadRequest                 400 (the caller can fix it)
    - InvalidParameter         400 InvalidParameter
      · ModelNotFound          400 InvalidParameter "Model not exist." (OpenAI: 404 model_not_found)
      · InputTooLong           400 InvalidParameter (context / max input / max output limits)
    - IllegalJson              400 BadRequest.IllegalInput
    - EmptyInput / EmptyModel  400 BadRequest.EmptyInput / BadRequest.EmptyModel
    - PayloadTooLarge          400 BadRequest.TooLarge (413 on the wire for raw bodies)
    - AudioError               400 InvalidParameter: something about one audio item
      · AudioEmpty, AudioTooShort, AudioTooLarge, AudioTooLong, DataUriTooLarge, InvalidAudio,
        UnsupportedCodec, DecodeTimeout, InvalidDataUri
    - MediaUrlError            400 InvalidURL: fetching an audio URL failed
      · DestinationBlocked, UnsupportedScheme
      · DownloadTimeout        400 InvalidURL.Timeout
      · ConnectionRefused      400 InvalidURL.ConnectionRefused
      · DownloadFailed         400 InvalidParameter "Failed to download multimodal content"
      · OssNotResolved         400 InvalidParameter (oss:// without the resolve header)
  + AuthError                  401 InvalidApiKey
  + AccessDenied               403 AccessDenied
    - QuotaExhausted           403 AllocationQuota.FreeTierOnly
  + NotFound                   404 NotFound
  + UploadRejected             403/400/409: the form upload to Ting's own upload host
  + RateLimited                429 Throttling.RateQuota (per-key requests per minute)
  + ConcurrencyLimited         429 Throttling (per-key concurrent requests)
  + Overloaded                 503 ServiceUnavailable (the engine's admission queue is full)
  + NotReady                   503 ModelUnavailable (model still loading, or shutting down)
  + ShuttingDown               503 ServiceUnavailable (cut at the end of the drain)
  + EngineError                500 InternalError (the model failed; never the caller's fault)
    - EngineDown               503 ModelUnavailable (the engine process died or hung; it is being restarted)
  + ModelLoadError             start-up: the checkpoint could not be found or loaded
"""

from __future__ import annotations


class TingError(Exception):
    status: int = 500
    code: str = "InternalError"
    default_message: str = "An internal error has occured, please try again later or contact service support."
    # OpenAI's envelope: {"error": {"type": ..., "code": ...}}
    openai_type: str = "server_error"
    openai_code: str | None = None

    def __init__(
        self, message: str | None = None, *, retry_after_s: float | None = None, param: str | None = None
    ) -> None:
        self.message = message or self.default_message
        self.retry_after_s = retry_after_s  # seconds a client should wait, for 429/503
        self.param = param  # the offending request field, where known (OpenAI's `param`)
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


# --- 400: the request is wrong -------------------------------------------------------------------------


class BadRequest(TingError):
    status = 400
    code = "InvalidParameter"
    default_message = "Required parameter(s) missing or invalid, please check the request parameters."
    openai_type = "invalid_request_error"
    openai_code: str | None = "invalid_value"


class InvalidParameter(BadRequest):
    pass


class ModelNotFound(InvalidParameter):
    default_message = "Model not exist."
    openai_code = "model_not_found"


class InputTooLong(InvalidParameter):
    openai_code = "context_length_exceeded"


class IllegalJson(BadRequest):
    code = "BadRequest.IllegalInput"
    default_message = "The input parameter requires json format."
    openai_code = "invalid_json"


class EmptyInput(BadRequest):
    code = "BadRequest.EmptyInput"
    default_message = "Required input parameter missing from request."
    openai_code = "missing_required_parameter"


class EmptyModel(BadRequest):
    code = "BadRequest.EmptyModel"
    default_message = 'Required parameter "model" missing from request.'
    openai_code = "missing_required_parameter"


class PayloadTooLarge(BadRequest):
    code = "BadRequest.TooLarge"
    default_message = "Payload Too Large."
    openai_code = "payload_too_large"


class AudioError(BadRequest):
    """Something is wrong with one audio item. The message says what."""

    code = "InvalidParameter"
    openai_code = "invalid_audio"


class AudioEmpty(AudioError):
    default_message = "The audio is empty"


class AudioTooShort(AudioError):
    default_message = "The audio is too short: at least 25 ms (400 samples at 16 kHz) is needed."


class AudioTooLarge(AudioError):
    default_message = "Multimodal file size is too large"


class AudioTooLong(AudioError):
    default_message = "The input audio is too long."


class DataUriTooLarge(AudioError):
    default_message = "Exceeded limit on max bytes per data-uri item : 10485760"


class InvalidDataUri(AudioError):
    default_message = "The data URI is invalid: expected data:[<mime>];base64,<payload>."


class InvalidAudio(AudioError):
    default_message = "The audio format is illegal and cannot be opened."


class UnsupportedCodec(AudioError):
    default_message = "The audio format is not supported."


class DecodeTimeout(AudioError):
    default_message = "Decoding the audio took too long; the file may be damaged."


class MediaUrlError(BadRequest):
    code = "InvalidURL"
    default_message = "Invalid URL provided in your request."
    openai_code = "invalid_url"


class DestinationBlocked(MediaUrlError):
    default_message = (
        "Invalid URL provided in your request: its destination is not allowed "
        "(private, loopback and link-local addresses are refused)."
    )


class UnsupportedScheme(MediaUrlError):
    default_message = (
        "Invalid URL provided in your request: audio must be an http(s) URL, a data: URI or an oss:// key."
    )


class DownloadTimeout(MediaUrlError):
    code = "InvalidURL.Timeout"
    default_message = "Download timeout, please check network connection."


class ConnectionRefused(MediaUrlError):
    code = "InvalidURL.ConnectionRefused"
    default_message = "Connection refused, please provide available URL."


class DownloadFailed(MediaUrlError):
    code = "InvalidParameter"
    default_message = "Failed to download multimodal content"


class OssNotResolved(MediaUrlError):
    code = "InvalidParameter"
    default_message = (
        "The provided URL does not appear to be valid. oss:// references need the header "
        "X-DashScope-OssResourceResolve: enable."
    )


# --- 401 / 403 / 404 ---------------------------------------------------------------------------------------


class AuthError(TingError):
    status = 401
    code = "InvalidApiKey"
    default_message = "Invalid API-key provided."
    openai_type = "invalid_request_error"
    openai_code = "invalid_api_key"


class AccessDenied(TingError):
    status = 403
    code = "AccessDenied"
    default_message = "Access denied."
    openai_type = "invalid_request_error"
    openai_code = "access_denied"


class QuotaExhausted(AccessDenied):
    code = "AllocationQuota.FreeTierOnly"
    default_message = (
        "The free tier of the model has been exhausted. If you wish to continue access the model on a "
        'paid basis, please disable the "use free tier only" mode in the management console.'
    )
    openai_type = "insufficient_quota"
    openai_code = "insufficient_quota"


class NotFound(TingError):
    status = 404
    code = "NotFound"
    default_message = "Not found."
    openai_type = "invalid_request_error"
    openai_code = "not_found"


class UploadRejected(TingError):
    """The form upload to Ting's own upload host was refused (OSS-style)."""

    status = 403
    code = "AccessDenied"
    default_message = "Invalid according to Policy: Policy expired."
    openai_type = "invalid_request_error"
    openai_code = "upload_rejected"

    def __init__(self, message: str | None = None, *, status: int = 403, code: str = "AccessDenied") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# --- 429 / 5xx -----------------------------------------------------------------------------------------------


class RateLimited(TingError):
    status = 429
    code = "Throttling.RateQuota"
    default_message = "Requests rate limit exceeded, please try again later."
    openai_type = "rate_limit_error"
    openai_code = "rate_limit_exceeded"


class ConcurrencyLimited(TingError):
    status = 429
    code = "Throttling"
    default_message = "Requests throttling triggered."
    openai_type = "rate_limit_error"
    openai_code = "rate_limit_exceeded"


class Overloaded(TingError):
    status = 503
    code = "ServiceUnavailable"
    default_message = "The server is overloaded, please try again later."
    openai_type = "server_error"
    openai_code = "overloaded"


class NotReady(TingError):
    status = 503
    code = "ModelUnavailable"
    default_message = "Model is unavailable, please try again later."
    openai_type = "server_error"
    openai_code = "model_unavailable"


class ShuttingDown(TingError):
    """The server is stopping: a request still running when the drain time ran out, or arriving during it."""

    status = 503
    code = "ServiceUnavailable"
    default_message = "The server is shutting down, please try again later."
    openai_type = "server_error"
    openai_code = "server_shutting_down"


class EngineError(TingError):
    status = 500
    code = "InternalError"
    openai_code = "internal_error"


class EngineDown(EngineError):
    """The engine process died or hung: everything in flight ends; a new one is being started."""

    status = 503
    code = "ModelUnavailable"
    default_message = "The model stopped unexpectedly and is being restarted, please try again later."
    openai_code = "model_unavailable"


class ModelLoadError(TingError):
    """The checkpoint could not be found or loaded (a start-up error; never sent to a client)."""

    status = 503
    code = "ModelUnavailable"
