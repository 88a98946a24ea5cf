// Copies the prebuilt browser bundles of the viewer's npm dependencies (no bundler needed: both ship UMD builds)
// into src/hwsi/serve/static/vendor/ (git-ignored), which `hwsi serve` serves under /static/vendor/.
// Run by `make venv` after `npm ci`; writes vendor/built.json last (the server checks it; not a dotfile, so a wheel built after it carries it).
import { cpSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const nm = join(here, "node_modules");
const out = join(here, "..", "src", "hwsi", "serve", "static", "vendor");
const files = [
  ["openseadragon/build/openseadragon/openseadragon.min.js", "openseadragon/openseadragon.min.js"],
  ["openseadragon/build/openseadragon/images", "openseadragon/images"],
  ["openseadragon/LICENSE.txt", "openseadragon/LICENSE.txt"],
  ["@annotorious/openseadragon/dist/annotorious-openseadragon.js", "annotorious/annotorious-openseadragon.js"],
  ["@annotorious/openseadragon/dist/annotorious-openseadragon.css", "annotorious/annotorious-openseadragon.css"],
];
rmSync(out, { recursive: true, force: true });
for (const [src, dst] of files) {
  mkdirSync(dirname(join(out, dst)), { recursive: true });
  cpSync(join(nm, src), join(out, dst), { recursive: true });
}
const built = {};
for (const pkg of ["openseadragon", "@annotorious/openseadragon"]) {
  const p = JSON.parse(readFileSync(join(nm, pkg, "package.json"), "utf8"));
  built[pkg] = { version: p.version, license: p.license, homepage: p.homepage || "" };
}
writeFileSync(join(out, "built.json"), JSON.stringify(built, null, 1) + "\n");
console.log(`web/build.mjs: ${Object.entries(built).map(([k, v]) => `${k} ${v.version}`).join(", ")} -> ${out}`);
