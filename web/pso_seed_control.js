// PSO.SeedControl: new PSO training and sampling nodes start with their seed set to "fixed".
// The frontend gives every `seed` input a "control after generate" widget that defaults to
// "randomize"; on a training node that re-samples references and retrains from scratch on every
// Queue, even after an unrelated change. Saved workflows keep whatever they stored: the saved
// value is applied after onNodeCreated. Scoped to this extension's nodes; the hook is chained.
import { app } from "../../scripts/app.js";

const PSO_SEEDED_NODES = new Set(["PSOTrain", "PSOSampleReferences", "PSOPickPairs"]);

app.registerExtension({
  name: "PSO.SeedControl",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!PSO_SEEDED_NODES.has(nodeData?.name)) {
      return;
    }
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      for (const widget of this.widgets ?? []) {
        if (widget.name === "control_after_generate" && widget.options?.values?.includes("fixed")) {
          widget.value = "fixed";
        }
      }
      return result;
    };
  },
});
