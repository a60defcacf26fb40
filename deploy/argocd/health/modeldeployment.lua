-- Argo CD health of a deeptune.dev ModelDeployment, from the status the operator writes.
-- Argo CD runs this with Lua's base and table libraries only: no string or math functions.
local hs = {}
local status = obj.status or {}

local function condition(kind)
  for _, c in ipairs(status.conditions or {}) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function explain(c, default)
  if c == nil then
    return default
  end
  if c.message == nil or c.message == "" then
    return c.reason or default
  end
  if c.reason == nil then
    return c.message
  end
  return c.reason .. ": " .. c.message
end

local function invalid_spec()
  for _, c in ipairs(status.conditions or {}) do
    if c.reason == "InvalidSpec" and c.status == "False" then
      return c
    end
  end
  return nil
end

local spec = obj.spec or {}
local scaled_to_zero = spec.replicas == 0 and not (spec.autoscaling or {}).enabled
local generation = (obj.metadata or {}).generation
local ready = condition("Ready")
local loaded = condition("ModelLoaded")
local promoted = condition("Promoted")
if status.modelState == nil and status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the DeepTune operator to report a status"
elseif generation ~= nil and (status.observedGeneration or 0) < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the DeepTune operator to observe generation " .. generation
elseif invalid_spec() ~= nil then
  hs.status = "Degraded"
  hs.message = explain(invalid_spec(), "InvalidSpec")
elseif promoted ~= nil and promoted.status == "False" then
  -- the referenced run missed spec.promotion: it is not served; a run served before keeps serving
  hs.status = "Degraded"
  hs.message = explain(promoted, "PromotionGateFailed")
elseif ready ~= nil and ready.status == "False" and ready.reason == "FineTuneJobFailed" then
  -- no model to serve until the referenced FineTuneJob is rerun and succeeds
  hs.status = "Degraded"
  hs.message = explain(ready, "FineTuneJobFailed")
elseif ready ~= nil and ready.status == "False" and ready.reason == "AdapterBaseMismatch" then
  -- an adapter trained on another base model: the spec must change
  hs.status = "Degraded"
  hs.message = explain(ready, "AdapterBaseMismatch")
elseif scaled_to_zero then
  hs.status = "Healthy"
  hs.message = "Scaled to zero: spec.replicas is 0"
elseif status.modelState == "FailedToLoad" then
  hs.status = "Degraded"
  if status.lastFailure ~= nil then
    hs.message = explain(status.lastFailure, "FailedToLoad")
  else
    hs.message = explain(loaded, "FailedToLoad")
  end
elseif ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = "Model loaded"
  if status.readyReplicas ~= nil and status.replicas ~= nil then
    hs.message = hs.message .. ", " .. status.readyReplicas .. "/" .. status.replicas .. " replicas ready"
  end
  if status.endpoints ~= nil and status.endpoints.openai ~= nil then
    hs.message = hs.message .. ", OpenAI API at " .. status.endpoints.openai
  elseif status.endpoints ~= nil and status.endpoints.http ~= nil then
    hs.message = hs.message .. ", serving at " .. status.endpoints.http
  end
elseif status.modelState == "Loaded" then
  hs.status = "Progressing"
  hs.message = explain(ready, "Model loaded; waiting for the Service to answer")
else
  hs.status = "Progressing"
  hs.message = explain(loaded, status.modelState or "Pending")
end
return hs
