// Keyboard shortcuts on the study view: they act on the highlighted ("current") finding's form.
document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.target.closest("input, textarea, select")) {
    if (e.key === "Escape") e.target.blur();
    return;
  }
  if (e.key === "n") {  // next in the queue: for viewers too
    const next = document.getElementById("next");
    if (next) { e.preventDefault(); next.click(); }
    return;
  }
  const form = document.querySelector("form.decision.current");
  if (!form) return;
  const click = (value) => form.querySelector(`button[value="${value}"]`).click();
  if (e.key === "c") { e.preventDefault(); click("confirm"); }
  else if (e.key === "r") { e.preventDefault(); click("reject"); }
  else if (e.key === "x") { e.preventDefault(); form.querySelector("[name=to_answer]").focus(); }
  else if (e.key === "m") { e.preventDefault(); form.querySelector("textarea[name=comment]").focus(); }
});
// Enter in the correction field submits a correction; Enter (without Shift) in the comment a comment.
document.addEventListener("keydown", (e) => {
  if (e.key !== "Enter" || e.shiftKey) return;
  const form = e.target.closest("form.decision");
  if (!form) return;
  if (e.target.name === "to_answer" || e.target.name === "comment") {
    e.preventDefault();
    form.querySelector(`button[value="${e.target.name === "to_answer" ? "correct" : "comment"}"]`).click();
  }
});
document.addEventListener("change", (e) => {
  if (e.target.matches("form.decision select[name=to_answer]") && e.target.value) {
    e.target.closest("form").querySelector('button[value="correct"]').focus();
  }
});
// after an HTMX swap, bring the current finding into view
document.addEventListener("htmx:afterSwap", () => {
  const current = document.querySelector("li.finding.current");
  if (current) current.scrollIntoView({ block: "center" });
  window.scrollTo({ top: 0 });
});
// P(yes) bars: their width comes from data-width (no inline styles: the Content-Security-Policy forbids them)
function drawBars() {
  document.querySelectorAll(".bar span[data-width]").forEach((bar) => {
    bar.style.width = `${bar.dataset.width}%`;
  });
}
drawBars();
document.addEventListener("htmx:afterSwap", drawBars);
// /docs (when enabled): Swagger UI from the local swagger-ui-dist files, started here, not inline
const swagger = document.getElementById("swagger-ui");
if (swagger && window.SwaggerUIBundle) {
  window.SwaggerUIBundle({ url: swagger.dataset.openapiUrl, dom_id: "#swagger-ui" });
}
