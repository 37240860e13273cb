"""Numba kernels: the ground shader, the LiDAR ray caster and the camera renderer.

Both sensors see the same scene: a ground plane at z = 0 shaded by the map layout (`ground_material`),
and oriented boxes (objects and buildings) given as rows (x, y, z, length, width, height, yaw) in the
global frame, length along the box heading. The camera renderer is a z-buffer: the ground fills the
buffer per pixel, then each box is tested only over the pixels of its projected bounding rectangle
and kept where it is nearer.
"""
from __future__ import annotations

import numba
import numpy as np

# Ground materials.
OFF_GRID, ASPHALT, WHITE, YELLOW, WALKWAY, ZEBRA, STOP, CARPARK, BAY, GRASS = range(10)
GROUND_COLORS = np.array([
    [118, 112, 96], [72, 72, 74], [225, 225, 220], [220, 180, 40], [158, 154, 146],
    [232, 232, 228], [238, 238, 236], [88, 86, 84], [215, 215, 210], [86, 120, 62],
], dtype=np.float64)
GROUND_INTENSITY = np.array([8.0, 6.0, 60.0, 45.0, 20.0, 60.0, 70.0, 7.0, 55.0, 4.0])

BUILDING = -1  # class id of building boxes in the renderer
SUN = np.array([0.45, 0.35, 0.82])
SUN = SUN / np.linalg.norm(SUN)


@numba.njit(cache=True)
def _fmod(a, m):
    return a - np.floor(a / m) * m


@numba.njit(cache=True)
def ground_material(x, y, gp):
    """Material id at global (x, y). `gp` = MapWorld.ground_params()."""
    ox, oy, c, s, S, n, hw, lane, walk, carpark, side = (gp[0], gp[1], gp[2], gp[3], gp[4], gp[5], gp[6],
                                                         gp[7], gp[8], gp[9], gp[10])
    px, py = x - ox, y - oy
    u = c * px + s * py
    v = -s * px + c * py
    ext = n * S
    i = np.floor(u / S + 0.5)
    j = np.floor(v / S + 0.5)
    du = u - i * S
    dv = v - j * S
    vi = 0 <= i <= n
    vj = 0 <= j <= n
    on_h = vj and abs(dv) < hw and -hw <= u <= ext + hw
    on_v = vi and abs(du) < hw and -hw <= v <= ext + hw
    if on_h and on_v:
        return ASPHALT
    if on_h or on_v:
        if on_h:
            lat, along, d_node, axis_sign = dv, u, du, -side
        else:
            lat, along, d_node, axis_sign = du, v, dv, side
        ad = abs(d_node)
        near_node = vi if on_h else vj
        if near_node and hw <= ad < hw + walk:
            return ZEBRA if _fmod(lat, 1.0) < 0.5 else ASPHALT
        if near_node and hw + walk + 0.5 <= ad < hw + walk + 1.0:
            arm = 1.0 if d_node > 0 else -1.0
            sgn = -arm * axis_sign  # lateral sign of the lanes heading to the node
            if 0.0 <= lat * sgn <= 2 * lane:
                return STOP
        al = abs(lat)
        if al < 0.12:
            return YELLOW
        if abs(al - lane) < 0.075 and _fmod(along, 9.0) < 3.0:
            return WHITE
        if abs(al - 2 * lane) < 0.075:
            return WHITE
        return ASPHALT
    lo_g, hi_g = -hw - walk, ext + hw + walk
    if vj and hw <= abs(dv) < hw + walk and lo_g <= u <= hi_g:
        return WALKWAY
    if vi and hw <= abs(du) < hw + walk and lo_g <= v <= hi_g:
        return WALKWAY
    if 0.0 <= u <= ext and 0.0 <= v <= ext:
        bu = _fmod(u, S)
        bv = _fmod(v, S)
        lo, hi = hw + walk, hw + walk + carpark
        ru, rv = -1.0, -1.0
        if lo <= bu < hi and lo <= bv < hi:
            ru, rv = bu - lo, bv - lo
        elif S - hi <= bu < S - lo and S - hi <= bv < S - lo:
            ru, rv = bu - (S - hi), bv - (S - hi)
        if ru >= 0.0:
            # Bays 2.6 m wide along u in two rows (rv in 5..15 and 20..30), cars parked along v.
            if _fmod(ru, 2.6) < 0.1 and _fmod(rv, 15.0) > 5.0:
                return BAY
            return CARPARK
        return GRASS
    return OFF_GRID


@numba.njit(cache=True)
def _ray_box(ox, oy, oz, dx, dy, dz, box):
    """Entry distance of the ray o + t d into the box (inf if missed or if o is inside), face, local hit."""
    cx, cy, cz, l, w, h, yaw = box[0], box[1], box[2], box[3], box[4], box[5], box[6]
    c, s = np.cos(yaw), np.sin(yaw)
    px, py, pz = ox - cx, oy - cy, oz - cz
    lo_ = (c * px + s * py, -s * px + c * py, pz)
    ld = (c * dx + s * dy, -s * dx + c * dy, dz)
    half = (l * 0.5, w * 0.5, h * 0.5)
    t0, t1 = -np.inf, np.inf
    face = -1
    for a in range(3):
        if abs(ld[a]) < 1e-12:
            if abs(lo_[a]) > half[a]:
                return np.inf, -1, 0.0, 0.0, 0.0
            continue
        ta = (-half[a] - lo_[a]) / ld[a]
        tb = (half[a] - lo_[a]) / ld[a]
        if ta > tb:
            ta, tb = tb, ta
        if ta > t0:
            t0 = ta
            face = a * 2 + (0 if ld[a] < 0 else 1)  # 0:+x 1:-x 2:+y 3:-y 4:+z 5:-z
        if tb < t1:
            t1 = tb
        if t0 > t1:
            return np.inf, -1, 0.0, 0.0, 0.0
    if t0 <= 0.0:
        return np.inf, -1, 0.0, 0.0, 0.0
    return t0, face, lo_[0] + t0 * ld[0], lo_[1] + t0 * ld[1], lo_[2] + t0 * ld[2]


@numba.njit(cache=True, nogil=True)
def lidar_cast(origin, yaw0, elevations, azimuth_steps, boxes, box_intensity, gp, ground_intensity, max_range,
               min_range, range_noise):
    """Cast the rays of a spinning LiDAR at `origin` (global) whose azimuth 0 points at global yaw `yaw0`.

    Ray r = ring * azimuth_steps + a has elevation `elevations[ring]` and azimuth a * 2pi / azimuth_steps
    (the sensor is level: its frame differs from the global one by a yaw only). Boxes are visited one by
    one over the azimuth window they cover, so the cost follows their angular size.

    Returns:
        hits (R, 3) global points, intensity (R,), hit_id (R,) int32 (box index, -1 ground, -2 nothing
        between min_range and max_range), any_hit (N,) int32: rays crossing each box, occluded or not.
    """
    n_ring = elevations.shape[0]
    A = azimuth_steps
    R = n_ring * A
    N = boxes.shape[0]
    step = 2 * np.pi / A
    dirs = np.empty((R, 3))
    for ring in range(n_ring):
        ce, se = np.cos(elevations[ring]), np.sin(elevations[ring])
        for a in range(A):
            az = yaw0 + a * step
            dirs[ring * A + a, 0] = ce * np.cos(az)
            dirs[ring * A + a, 1] = ce * np.sin(az)
            dirs[ring * A + a, 2] = se
    ox, oy, oz = origin[0], origin[1], origin[2]
    best = np.full(R, max_range)
    hit_id = np.full(R, -2, np.int32)
    for r in range(R):
        dz = dirs[r, 2]
        if dz < -1e-9:
            tg = -oz / dz
            if tg < max_range:
                best[r] = tg
                hit_id[r] = -1
    any_hit = np.zeros(N, np.int32)
    for k in range(N):
        b = boxes[k]
        rad = 0.5 * np.sqrt(b[3] * b[3] + b[4] * b[4] + b[5] * b[5])
        dist = np.sqrt((b[0] - ox) ** 2 + (b[1] - oy) ** 2)
        if dist - rad >= max_range:
            continue
        c, s = np.cos(b[6]), np.sin(b[6])
        # Is the sensor above the footprint? Then every azimuth may hit.
        px, py = ox - b[0], oy - b[1]
        inside = abs(c * px + s * py) <= b[3] * 0.5 and abs(-s * px + c * py) <= b[4] * 0.5
        if inside:
            a0, a1 = 0, A - 1
        else:
            th0 = np.arctan2(b[1] - oy, b[0] - ox)
            dmin, dmax = 1e9, -1e9
            for corner in range(4):
                ax = (1.0 if corner & 1 else -1.0) * b[3] * 0.5
                ay = (1.0 if corner & 2 else -1.0) * b[4] * 0.5
                th = np.arctan2(b[1] + s * ax + c * ay - oy, b[0] + c * ax - s * ay - ox)
                dth = th - th0
                dth = dth - 2 * np.pi * np.floor((dth + np.pi) / (2 * np.pi))
                dmin = min(dmin, dth)
                dmax = max(dmax, dth)
            a0 = int(np.floor((th0 + dmin - yaw0) / step))
            a1 = int(np.ceil((th0 + dmax - yaw0) / step))
            if a1 - a0 >= A:
                a0, a1 = 0, A - 1
        for ai in range(a0, a1 + 1):
            a = ai % A
            for ring in range(n_ring):
                r = ring * A + a
                t, face, lx, ly, lz = _ray_box(ox, oy, oz, dirs[r, 0], dirs[r, 1], dirs[r, 2], b)
                if t < max_range:
                    any_hit[k] += 1
                    if t < best[r]:
                        best[r] = t
                        hit_id[r] = k
    hits = np.zeros((R, 3))
    inten = np.zeros(R)
    for r in range(R):
        if hit_id[r] == -2 or best[r] < min_range:
            hit_id[r] = -2
            continue
        t = best[r] + range_noise[r]
        hits[r, 0] = ox + t * dirs[r, 0]
        hits[r, 1] = oy + t * dirs[r, 1]
        hits[r, 2] = oz + t * dirs[r, 2]
        if hit_id[r] == -1:
            hits[r, 2] = 0.0  # range noise must not push ground returns below the ground
            inten[r] = ground_intensity[ground_material(ox + best[r] * dirs[r, 0], oy + best[r] * dirs[r, 1], gp)]
        else:
            inten[r] = box_intensity[hit_id[r]]
    return hits, inten, hit_id, any_hit


@numba.njit(cache=True)
def _shade_box(cls, face, lx, ly, lz, box, base, shade, wx, wy, wz):
    """RGB of a box surface point; (lx, ly, lz) in the box frame, (wx, wy, wz) the world face normal."""
    l, w, h = box[3], box[4], box[5]
    zr = (lz + 0.5 * h) / h
    light = 0.55 + 0.45 * max(0.0, wx * SUN[0] + wy * SUN[1] + wz * SUN[2])
    r, g, b = base[0] * shade, base[1] * shade, base[2] * shade
    f = light
    if cls == BUILDING:
        if face < 4:
            along = ly if face < 2 else lx
            if _fmod(along, 3.0) > 0.8 and _fmod(lz + 0.5 * h, 3.2) > 1.0 and lz + 0.5 * h > 1.0:
                r, g, b = 60.0, 70.0, 88.0
    elif cls <= 4:  # vehicles: car, truck, construction_vehicle, bus, trailer
        if cls != 4 and face < 4 and 0.62 < zr < 0.86:
            f *= 0.4
        if zr < 0.12:
            r, g, b = 35.0, 35.0, 35.0
    elif cls == 5:  # barrier: diagonal white stripes
        if _fmod((ly + lz) / 0.7 + 0.5, 1.0) < 0.22:
            r, g, b = 235.0, 235.0, 235.0
    elif cls == 9:  # traffic cone: a white band
        if 0.62 < zr < 0.75:
            r, g, b = 235.0, 235.0, 235.0
        if zr < 0.06:
            r, g, b = 40.0, 40.0, 40.0
    elif cls == 8:  # pedestrian: head, shirt, trousers
        if zr > 0.86:
            r, g, b = 205.0, 170.0, 140.0
        elif zr < 0.45:
            f *= 0.45
    elif cls == 6 or cls == 7:  # motorcycle, bicycle: dark wheels low down
        if zr < 0.3:
            r, g, b = 30.0, 30.0, 30.0
    return min(255.0, r * f), min(255.0, g * f), min(255.0, b * f)


@numba.njit(cache=True, nogil=True)
def render_camera(kk, k_inv, cam_r, cam_t, width, height, boxes, box_cls, box_color, box_shade, gp, ground_colors,
                  near, far):
    """Render one camera. cam_r/cam_t map camera coordinates to global; boxes (N, 7) global.

    Args:
        kk, k_inv: (3, 3) intrinsics and inverse; box_cls (N,) int (class index, BUILDING for buildings);
        box_color (N, 3) base RGB; box_shade (N,) brightness factor; near/far clip distances [m].
    Returns:
        (height, width, 3) uint8 image.
    """
    img = np.zeros((height, width, 3), np.uint8)
    depth = np.full((height, width), np.inf)
    ox, oy, oz = cam_t[0], cam_t[1], cam_t[2]
    # Ray direction per pixel, scaled so that its camera-z component is 1: t is depth along the axis.
    m = cam_r @ k_inv
    for v in range(height):
        for u in range(width):
            pu, pv = u + 0.5, v + 0.5
            dx = m[0, 0] * pu + m[0, 1] * pv + m[0, 2]
            dy = m[1, 0] * pu + m[1, 1] * pv + m[1, 2]
            dz = m[2, 0] * pu + m[2, 1] * pv + m[2, 2]
            norm = np.sqrt(dx * dx + dy * dy + dz * dz)
            if dz < -1e-9:
                t = -oz / dz
                if t * norm < far:
                    mat = ground_material(ox + t * dx, oy + t * dy, gp)
                    fade = min(1.0, t * norm / far) ** 2
                    for ch in range(3):
                        img[v, u, ch] = np.uint8(ground_colors[mat, ch] * (1 - fade) + 190.0 * fade)
                    depth[v, u] = t
                    continue
            el = dz / norm
            img[v, u, 0] = np.uint8(200 - 80 * max(0.0, el))
            img[v, u, 1] = np.uint8(215 - 50 * max(0.0, el))
            img[v, u, 2] = np.uint8(232 - 10 * max(0.0, el))
    rt = cam_r.T
    for k in range(boxes.shape[0]):
        b = boxes[k]
        c, s = np.cos(b[6]), np.sin(b[6])
        # Corners in the camera frame; the projected rectangle of the part in front of the near plane
        # comes from the front corners plus the near-plane crossings of the 12 edges.
        cc = np.empty((8, 3))
        for corner in range(8):
            ax = (1.0 if corner & 1 else -1.0) * b[3] * 0.5
            ay = (1.0 if corner & 2 else -1.0) * b[4] * 0.5
            az = (1.0 if corner & 4 else -1.0) * b[5] * 0.5
            gx = b[0] + c * ax - s * ay - ox
            gy = b[1] + s * ax + c * ay - oy
            gz = b[2] + az - oz
            cc[corner, 0] = rt[0, 0] * gx + rt[0, 1] * gy + rt[0, 2] * gz
            cc[corner, 1] = rt[1, 0] * gx + rt[1, 1] * gy + rt[1, 2] * gz
            cc[corner, 2] = rt[2, 0] * gx + rt[2, 1] * gy + rt[2, 2] * gz
        umin, umax, vmin, vmax = 1e18, -1e18, 1e18, -1e18
        n_front = 0
        for corner in range(8):
            if cc[corner, 2] >= near:
                n_front += 1
                pu = (kk[0, 0] * cc[corner, 0] + kk[0, 1] * cc[corner, 1]) / cc[corner, 2] + kk[0, 2]
                pv = (kk[1, 1] * cc[corner, 1]) / cc[corner, 2] + kk[1, 2]
                umin, umax = min(umin, pu), max(umax, pu)
                vmin, vmax = min(vmin, pv), max(vmax, pv)
        if n_front == 0:
            continue
        if n_front < 8:
            for e0 in range(8):
                for bit in (1, 2, 4):
                    e1 = e0 | bit
                    if e1 == e0:
                        continue
                    z0, z1 = cc[e0, 2], cc[e1, 2]
                    if (z0 < near) != (z1 < near):
                        a = (near - z0) / (z1 - z0)
                        x = cc[e0, 0] + a * (cc[e1, 0] - cc[e0, 0])
                        y = cc[e0, 1] + a * (cc[e1, 1] - cc[e0, 1])
                        pu = (kk[0, 0] * x + kk[0, 1] * y) / near + kk[0, 2]
                        pv = (kk[1, 1] * y) / near + kk[1, 2]
                        umin, umax = min(umin, pu), max(umax, pu)
                        vmin, vmax = min(vmin, pv), max(vmax, pv)
        u0 = max(0, int(np.floor(max(umin, -1e9))))
        u1 = min(width - 1, int(np.ceil(min(umax, 1e9))))
        v0 = max(0, int(np.floor(max(vmin, -1e9))))
        v1 = min(height - 1, int(np.ceil(min(vmax, 1e9))))
        if u0 > u1 or v0 > v1:
            continue
        cls = box_cls[k]
        base = box_color[k]
        for v in range(v0, v1 + 1):
            for u in range(u0, u1 + 1):
                pu, pv = u + 0.5, v + 0.5
                dx = m[0, 0] * pu + m[0, 1] * pv + m[0, 2]
                dy = m[1, 0] * pu + m[1, 1] * pv + m[1, 2]
                dz = m[2, 0] * pu + m[2, 1] * pv + m[2, 2]
                t, face, lx, ly, lz = _ray_box(ox, oy, oz, dx, dy, dz, b)
                if t < depth[v, u]:
                    depth[v, u] = t
                    # Face normal in the world frame.
                    nx, ny, nz = 0.0, 0.0, 0.0
                    sg = 1.0 if face % 2 == 0 else -1.0
                    if face < 2:
                        nx, ny = c * sg, s * sg
                    elif face < 4:
                        nx, ny = -s * sg, c * sg
                    else:
                        nz = sg
                    r, g, bb = _shade_box(cls, face, lx, ly, lz, b, base, box_shade[k], nx, ny, nz)
                    img[v, u, 0] = np.uint8(r)
                    img[v, u, 1] = np.uint8(g)
                    img[v, u, 2] = np.uint8(bb)
    return img
