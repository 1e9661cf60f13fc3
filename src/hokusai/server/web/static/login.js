// A link such as /mlflow/#/experiments/1/runs/abc reaches the sign-in page with its #fragment (browsers keep it
// across the redirect) but a form post would drop it: carry it in `next`, so signing in lands on the run.
(function () {
  var next = document.getElementById("next");
  if (next && window.location.hash && next.value.indexOf("#") === -1) {
    next.value = next.value + window.location.hash;
  }
})();
