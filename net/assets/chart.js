// A line chart as plain SVG: no library, no canvas, scales to its container.

const SVG = 'http://www.w3.org/2000/svg'; // the SVG namespace's name, not a request
const WIDTH = 600;
const HEIGHT = 160;
const PAD = { left: 48, right: 8, top: 8, bottom: 20 };

function element(name, attributes, text) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function label(value) {
  if (value >= 1e6) return (value / 1e6).toFixed(1) + 'M';
  if (value >= 1e3) return (value / 1e3).toFixed(1) + 'k';
  return Number.isInteger(value) ? String(value) : value.toFixed(1);
}

/** Draws `values` (one per second, oldest first) into `container`, replacing what was there. */
export function drawLine(container, values, name) {
  const max = Math.max(1, ...values);
  const innerWidth = WIDTH - PAD.left - PAD.right;
  const innerHeight = HEIGHT - PAD.top - PAD.bottom;
  const x = (index) => PAD.left + (values.length <= 1 ? innerWidth : (index / (values.length - 1)) * innerWidth);
  const y = (value) => PAD.top + innerHeight - (value / max) * innerHeight;
  const svg = element('svg', { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: 'img', 'aria-label': `${name}: last ${values.length} seconds, latest ${label(values.at(-1) ?? 0)}` });
  for (const fraction of [0, 0.5, 1]) {
    const value = max * fraction;
    svg.append(element('line', { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(value), y2: y(value), class: 'grid' }));
    svg.append(element('text', { x: PAD.left - 6, y: y(value) + 4, 'text-anchor': 'end', class: 'axis' }, label(value)));
  }
  svg.append(element('text', { x: PAD.left, y: HEIGHT - 4, class: 'axis' }, `−${values.length} s`));
  svg.append(element('text', { x: WIDTH - PAD.right, y: HEIGHT - 4, 'text-anchor': 'end', class: 'axis' }, 'now'));
  if (values.length > 0) {
    const points = values.map((value, index) => `${x(index).toFixed(1)},${y(value).toFixed(1)}`).join(' ');
    svg.append(element('polyline', { points, class: 'line' }));
  }
  container.replaceChildren(svg);
}
