// Status line and error box shared by the demo (main.js) and the model page (chat.js):
// the page needs elements #status and #error.

const $ = (id) => document.getElementById(id);

// Shows `text` in #status with a state (loading, running, done, error) for the style
// and for tests (also set on <body>).
export function setStatus(state, text) {
  const s = $("status");
  s.dataset.state = state;
  s.textContent = text;
  document.body.dataset.state = state;
}

// Shows an error in #error and sets the failed state; `who` prefixes the console line.
export function showError(err, who = "wgsparse") {
  const msg = err && err.message ? err.message : String(err);
  const box = $("error");
  box.textContent = "Error: " + msg;
  box.style.display = "block";
  setStatus("error", "failed");
  console.warn(who + ":", msg);
}

export function clearError() {
  $("error").style.display = "none";
  $("error").textContent = "";
}
