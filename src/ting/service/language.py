"""The spoken language of a recording, as Whisper names it: asked of the model, read from its answer.

Whisper reports a language as its full lowercase English name ("english", "chinese", "cantonese"). Qwen2-Audio has
no language token to read; it is asked instead ("Which language is spoken in this audio?") with a short greedy
answer on the first window, and the first language that answer names is the result. An answer that names no
language gives UNKNOWN.
"""

from __future__ import annotations

import re

from ting.types import AudioClip, AudioPart, Message, SamplingParams, TextPart

QUESTION = "Which language is spoken in this audio? Answer with the name of the language only."
ANSWER_MAX_TOKENS = 8
UNKNOWN = "unknown"

# Whisper's language codes and names (openai/whisper, whisper/tokenizer.py).
WHISPER_LANGUAGES = {
    "en": "english",
    "zh": "chinese",
    "de": "german",
    "es": "spanish",
    "ru": "russian",
    "ko": "korean",
    "fr": "french",
    "ja": "japanese",
    "pt": "portuguese",
    "tr": "turkish",
    "pl": "polish",
    "ca": "catalan",
    "nl": "dutch",
    "ar": "arabic",
    "sv": "swedish",
    "it": "italian",
    "id": "indonesian",
    "hi": "hindi",
    "fi": "finnish",
    "vi": "vietnamese",
    "he": "hebrew",
    "uk": "ukrainian",
    "el": "greek",
    "ms": "malay",
    "cs": "czech",
    "ro": "romanian",
    "da": "danish",
    "hu": "hungarian",
    "ta": "tamil",
    "no": "norwegian",
    "th": "thai",
    "ur": "urdu",
    "hr": "croatian",
    "bg": "bulgarian",
    "lt": "lithuanian",
    "la": "latin",
    "mi": "maori",
    "ml": "malayalam",
    "cy": "welsh",
    "sk": "slovak",
    "te": "telugu",
    "fa": "persian",
    "lv": "latvian",
    "bn": "bengali",
    "sr": "serbian",
    "az": "azerbaijani",
    "sl": "slovenian",
    "kn": "kannada",
    "et": "estonian",
    "mk": "macedonian",
    "br": "breton",
    "eu": "basque",
    "is": "icelandic",
    "hy": "armenian",
    "ne": "nepali",
    "mn": "mongolian",
    "bs": "bosnian",
    "kk": "kazakh",
    "sq": "albanian",
    "sw": "swahili",
    "gl": "galician",
    "mr": "marathi",
    "pa": "punjabi",
    "si": "sinhala",
    "km": "khmer",
    "sn": "shona",
    "yo": "yoruba",
    "so": "somali",
    "af": "afrikaans",
    "oc": "occitan",
    "ka": "georgian",
    "be": "belarusian",
    "tg": "tajik",
    "sd": "sindhi",
    "gu": "gujarati",
    "am": "amharic",
    "yi": "yiddish",
    "lo": "lao",
    "uz": "uzbek",
    "fo": "faroese",
    "ht": "haitian creole",
    "ps": "pashto",
    "tk": "turkmen",
    "nn": "nynorsk",
    "mt": "maltese",
    "sa": "sanskrit",
    "lb": "luxembourgish",
    "my": "myanmar",
    "bo": "tibetan",
    "tl": "tagalog",
    "mg": "malagasy",
    "as": "assamese",
    "tt": "tatar",
    "haw": "hawaiian",
    "ln": "lingala",
    "ha": "hausa",
    "ba": "bashkir",
    "jw": "javanese",
    "su": "sundanese",
    "yue": "cantonese",
}

# Other ways an answer names a language (the model answers in English or Chinese).
_ALIASES = {
    "mandarin": "chinese",
    "putonghua": "chinese",
    "farsi": "persian",
    "burmese": "myanmar",
    "filipino": "tagalog",
    "中文": "chinese",
    "汉语": "chinese",
    "普通话": "chinese",
    "国语": "chinese",
    "华语": "chinese",
    "粤语": "cantonese",
    "广东话": "cantonese",
    "英语": "english",
    "英文": "english",
    "日语": "japanese",
    "日文": "japanese",
    "韩语": "korean",
    "韩文": "korean",
    "法语": "french",
    "德语": "german",
    "西班牙语": "spanish",
    "意大利语": "italian",
    "俄语": "russian",
    "葡萄牙语": "portuguese",
    "阿拉伯语": "arabic",
    "泰语": "thai",
    "越南语": "vietnamese",
    "印尼语": "indonesian",
    "荷兰语": "dutch",
    "土耳其语": "turkish",
}
_NAMES = {name: name for name in WHISPER_LANGUAGES.values()} | _ALIASES
# Longest first, so "haitian creole" wins over a shorter name inside it; Latin names whole words only.
_PATTERN = re.compile(
    "|".join(re.escape(n) if not n.isascii() else rf"\b{re.escape(n)}\b" for n in sorted(_NAMES, key=len, reverse=True))
)


def whisper_name(language: str | None) -> str:
    """Whisper's name for a language code ("en" -> "english"; "zh-CN" -> "chinese"), or a name given as one."""
    if not language:
        return UNKNOWN
    key = language.strip().lower()
    if key in _NAMES:
        return _NAMES[key]
    return WHISPER_LANGUAGES.get(key, WHISPER_LANGUAGES.get(key.split("-")[0], key))


def language_from_answer(answer: str) -> str:
    """The first language the model's answer names, as Whisper names it; UNKNOWN if it names none."""
    match = _PATTERN.search(answer.lower())
    return _NAMES[match.group(0)] if match else UNKNOWN


def question(clip: AudioClip) -> tuple[Message, ...]:
    """The messages that ask the model which language `clip` is spoken in."""
    return (Message("user", (AudioPart("upload", clip), TextPart(QUESTION))),)


ANSWER_SAMPLING = SamplingParams(temperature=0.0, max_tokens=ANSWER_MAX_TOKENS)
