// PSO.FloatDigits: this extension's small float inputs (learning_rate, step 1e-6) keep their digits in
// Nodes 2.0 with the frontend ComfyUI 0.3.75 pins (1.32.9). Its Vue number field hands the widget's
// options to PrimeVue's InputNumber but sets no fraction digits from the input's precision, so
// PrimeVue's default of at most 3 decimals showed a learning rate of 1e-4 or 1e-5 as "0". Giving the
// widget minFractionDigits / maxFractionDigits (PrimeVue's own prop names) equal to the precision the
// frontend derived from the step shows 0.000100, as the classic canvas does; newer frontends (1.49+)
// set the same digits themselves and override these, and the classic canvas ignores them. Only
// widgets whose precision is above PrimeVue's default are touched; scoped to nodes in the "PSO/"
// categories; the hook is chained.
import { app } from "../../scripts/app.js";

const PRIMEVUE_DEFAULT_DIGITS = 3;
const PRIMEVUE_MAX_DIGITS = 20;

app.registerExtension({
  name: "PSO.FloatDigits",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.category?.startsWith("PSO/")) {
      return;
    }
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      for (const widget of this.widgets ?? []) {
        const options = widget.options;
        const precision = options?.precision;
        if (widget.type !== "number" || typeof precision !== "number" || precision <= PRIMEVUE_DEFAULT_DIGITS) {
          continue;
        }
        const digits = Math.min(precision, PRIMEVUE_MAX_DIGITS);
        options.minFractionDigits ??= digits;
        options.maxFractionDigits ??= digits;
      }
      return result;
    };
  },
});
