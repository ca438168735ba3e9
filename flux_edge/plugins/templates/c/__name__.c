/*
 * {{name}}: a flux-edge plugin (ABI v1) in freestanding C.
 *
 * Starting point from `flux-edge plugin new`: every register word of a kind-1 message becomes
 * a measurement <prefix><address> = word * scale. Replace the two functions below with your
 * own logic; flux_plugin.h (vendored next to this file) documents the API, and
 * docs/plugin-guide.md walks through it.
 */
#include "flux_plugin.h"

static double scale = 1.0;
static char prefix[32] = "r";

/* Called once with the config as JSON. Non-zero refuses it; log the reason at error level. */
int flux_plugin_init(const char *cfg, uint32_t len) {
    if (flux_cfg_has(cfg, len, "scale") && !flux_cfg_number(cfg, len, "scale", &scale)) {
        flux_log_error("scale must be a number");
        return 1;
    }
    if (flux_cfg_has(cfg, len, "prefix") && flux_cfg_string(cfg, len, "prefix", prefix, sizeof prefix) < 0) {
        flux_log_error("prefix must be a string");
        return 1;
    }
    return 0;
}

/* Called once per input message; write measurements or an error to `out`. */
void flux_plugin_process(const flux_msg *m, flux_out *out) {
    if (m->kind != FLUX_KIND_REGISTERS) {
        char msg[64];
        flux_text t = flux_text_on(msg, sizeof msg);
        flux_text_str(&t, "expected register words (kind 1), got kind ");
        flux_text_i64(&t, m->kind);
        flux_out_error(out, msg);
        return;
    }
    for (uint32_t i = 0; i < flux_msg_register_count(m); i++) {
        char name[64];
        flux_text t = flux_text_on(name, sizeof name);
        flux_text_str(&t, prefix);
        flux_text_i64(&t, (int64_t)m->address + i);
        flux_out_f64(out, name, flux_msg_register(m, i) * scale, "");
    }
}
