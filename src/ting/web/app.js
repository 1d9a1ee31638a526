// The Ting playground: plain JavaScript against the server's own DashScope and OpenAI endpoints (same origin).
"use strict";

const $ = (id) => document.getElementById(id);
const GENERATION = "/api/v1/services/aigc/multimodal-generation/generation";
const INLINE_MAX_BYTES = 7 * 1024 * 1024; // bigger files go through the upload flow (oss://)
let history = [];          // the conversation, in DashScope message form
let audioRef = null;       // the current recording as a data: URI or an oss:// reference
let recorder = null;

$("key").value = localStorage.getItem("ting-key") || "";
$("key").addEventListener("change", () => localStorage.setItem("ting-key", $("key").value));

function headers(extra = {}) {
  const key = $("key").value.trim();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : extra;
}

function status(text) { $("status").textContent = text; }

async function errorText(response) {
  try {
    const body = await response.json();
    const e = body.error || body;
    return `${response.status} ${e.code || ""}: ${e.message || JSON.stringify(body)}`;
  } catch { return `${response.status} ${response.statusText}`; }
}

async function loadModels() {
  const r = await fetch("/v1/models", { headers: headers() });
  const select = $("model");
  select.innerHTML = "";
  const names = r.ok ? (await r.json()).data.map((m) => m.id) : ["qwen-audio-turbo-latest"];
  for (const name of names) select.add(new Option(name, name, false, name === "qwen-audio-turbo-latest"));
  const h = await fetch("/health");
  const health = await h.json();
  status(h.ok ? `model ${health.model} on ${health.device} (${health.dtype})` : `server: ${health.status}`);
}

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    document.querySelectorAll(".tab, .panel").forEach((el) => el.classList.remove("active"));
    tab.classList.add("active");
    $(tab.dataset.tab).classList.add("active");
  });
}

function readAsDataURI(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve("data:;base64," + reader.result.split(",")[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function upload(blob, name) {
  const model = $("model").value;
  const p = await fetch(`/api/v1/uploads?action=getPolicy&model=${encodeURIComponent(model)}`, { headers: headers() });
  if (!p.ok) throw new Error(await errorText(p));
  const policy = (await p.json()).data;
  const key = `${policy.upload_dir}/${name.replace(/[^A-Za-z0-9._-]/g, "_") || "audio"}`;
  const form = new FormData();
  for (const [field, value] of [["OSSAccessKeyId", policy.oss_access_key_id], ["Signature", policy.signature],
    ["policy", policy.policy], ["key", key], ["x-oss-object-acl", policy.x_oss_object_acl],
    ["x-oss-forbid-overwrite", policy.x_oss_forbid_overwrite], ["success_action_status", "200"]]) form.append(field, value);
  form.append("file", blob, name);
  const u = await fetch(policy.upload_host, { method: "POST", body: form });
  if (!u.ok) throw new Error(await errorText(u));
  return `oss://${key}`;
}

async function useAudio(blob, name) {
  $("preview").src = URL.createObjectURL(blob);
  $("preview").hidden = false;
  audioRef = blob.size <= INLINE_MAX_BYTES ? await readAsDataURI(blob) : await upload(blob, name);
  history = [];
  $("conversation").innerHTML = "";
}

$("chat-file").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  if (file) await useAudio(file, file.name).catch((err) => addTurn("error", err.message));
});

$("record").addEventListener("click", async () => {
  if (recorder) { recorder.stop(); return; }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const chunks = [];
    recorder = new MediaRecorder(stream);
    recorder.ondataavailable = (e) => chunks.push(e.data);
    recorder.onstop = async () => {
      stream.getTracks().forEach((t) => t.stop());
      $("record").classList.remove("recording");
      $("record").textContent = "● Record";
      recorder = null;
      await useAudio(new Blob(chunks, { type: chunks[0]?.type || "audio/webm" }), "recording.webm");
    };
    recorder.start();
    $("record").classList.add("recording");
    $("record").textContent = "■ Stop";
  } catch (err) { addTurn("error", `microphone: ${err.message}`); }
});

function addTurn(kind, text) {
  const div = document.createElement("div");
  div.className = `turn ${kind}`;
  div.textContent = text;
  $("conversation").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

$("reset").addEventListener("click", () => { history = []; $("conversation").innerHTML = ""; });

$("ask").addEventListener("submit", async (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  const url = $("chat-url").value.trim();
  const content = [];
  if (history.length === 0) {
    if (url) content.push({ audio: url });
    else if (audioRef) content.push({ audio: audioRef });
  }
  if (question) content.push({ text: question });
  if (content.length === 0) { addTurn("error", "Choose a recording (file, microphone or URL) or ask something."); return; }
  const messages = [...history, { role: "user", content }];
  addTurn("user", (content.some((c) => c.audio) ? "🎧 " : "") + (question || "(voice chat)"));
  const answer = addTurn("assistant", "");
  const parameters = { incremental_output: true, max_tokens: Number($("max-tokens").value) || undefined };
  if ($("temperature").value !== "") parameters.temperature = Number($("temperature").value);
  $("send").disabled = true;
  const oss = messages.some((m) => m.content.some((c) => typeof c.audio === "string" && c.audio.startsWith("oss://")));
  try {
    const response = await fetch(GENERATION, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", "X-DashScope-SSE": "enable",
        ...(oss ? { "X-DashScope-OssResourceResolve": "enable" } : {}) }),
      body: JSON.stringify({ model: $("model").value, input: { messages }, parameters }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", text = "", event = "result", last = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 1);
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) {
          const data = JSON.parse(line.slice(5));
          if (event === "error") throw new Error(`${data.code}: ${data.message}`);
          text += data.output.choices[0].message.content.map((c) => c.text).join("");
          answer.textContent = text;
          last = data;
        }
      }
    }
    if (last) {
      const u = last.usage;
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = `${last.output.choices[0].finish_reason} · audio ${u.audio_tokens} + input ${u.input_tokens} + output ${u.output_tokens} tokens · ${last.request_id}`;
      answer.appendChild(meta);
    }
    history = [...messages, { role: "assistant", content: [{ text }] }];
    $("question").value = "";
  } catch (err) {
    answer.remove();
    addTurn("error", err.message);
  } finally {
    $("send").disabled = false;
  }
});

$("transcribe-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const file = $("tr-file").files[0];
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("model", $("model").value);
  form.append("response_format", $("tr-format").value);
  if ($("tr-language").value.trim()) form.append("language", $("tr-language").value.trim());
  const task = $("tr-translate").checked ? "translations" : "transcriptions";
  $("tr-result").textContent = "…";
  const r = await fetch(`/v1/audio/${task}`, { method: "POST", headers: headers(), body: form });
  if (!r.ok) { $("tr-result").textContent = await errorText(r); return; }
  $("tr-result").textContent = $("tr-format").value === "verbose_json" ? JSON.stringify(await r.json(), null, 2) : await r.text();
});

loadModels().catch((err) => status(`cannot reach the server: ${err.message}`));
