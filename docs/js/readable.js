// Tables and inline code that read well at 400 px and at 1280 px (with docs/css/extra.css).
//
// * Each table cell gets its column's name (data-label): on a narrow screen the table is
//   shown as one block per row, each value under its column's name.
// * Inline code wraps only at its spaces: a flag such as --database never breaks after its
//   dashes, a class name such as SecurePolicyError never inside. A long token (a URL, a path)
//   may break after its slashes, dots and underscores. What is copied is unchanged: only
//   <span> and <wbr> elements are added.
// Without JavaScript the page still reads: tables scroll sideways, code wraps as the browser
// likes.
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll(".col-md-9 table").forEach(function (table) {
    var heads = Array.prototype.map.call(table.querySelectorAll("thead th"), function (th) {
      return th.textContent.trim();
    });
    table.querySelectorAll("tbody tr").forEach(function (row) {
      Array.prototype.forEach.call(row.children, function (cell, index) {
        if (heads[index]) {
          cell.setAttribute("data-label", heads[index]);
        }
      });
    });
    table.classList.add("labelled");
  });
  document.querySelectorAll(".col-md-9 :not(pre) > code").forEach(function (code) {
    if (code.children.length) {
      return; // marked up already (a link inside, say): leave it as written
    }
    var text = code.textContent;
    code.textContent = "";
    text.split(/( +)/).forEach(function (part) {
      if (!part || /^ +$/.test(part)) {
        code.appendChild(document.createTextNode(part));
        return;
      }
      var span = document.createElement("span");
      if (part.length > 24) {
        span.className = "long";
        part.split(/(?<=[\/._=&?])/).forEach(function (piece, index) {
          if (index) {
            span.appendChild(document.createElement("wbr"));
          }
          span.appendChild(document.createTextNode(piece));
        });
      } else {
        span.className = "token";
        span.textContent = part;
      }
      code.appendChild(span);
    });
  });
});
