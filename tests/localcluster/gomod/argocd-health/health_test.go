// Package argocdhealth runs DeepTune's Argo CD health scripts in Argo CD's own Lua VM: each case of the
// JSON file DEEPTUNE_HEALTH_CASES names must give the status and message the case expects.
package argocdhealth

import (
	"encoding/json"
	"os"
	"testing"

	"github.com/argoproj/argo-cd/v3/util/lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

type healthCase struct {
	Name    string         `json:"name"`
	Script  string         `json:"script"`
	Object  map[string]any `json:"object"`
	Status  string         `json:"status"`
	Message string         `json:"message"`
}

func TestHealthScripts(t *testing.T) {
	data, err := os.ReadFile(os.Getenv("DEEPTUNE_HEALTH_CASES"))
	if err != nil {
		t.Fatalf("DEEPTUNE_HEALTH_CASES: %v", err)
	}
	var cases []healthCase
	if err := json.Unmarshal(data, &cases); err != nil {
		t.Fatal(err)
	}
	vm := lua.VM{}
	for _, c := range cases {
		got, err := vm.ExecuteHealthLua(&unstructured.Unstructured{Object: c.Object}, c.Script)
		if err != nil {
			t.Errorf("%s: %v", c.Name, err)
			continue
		}
		if string(got.Status) != c.Status || got.Message != c.Message {
			t.Errorf("%s: got %s %q, want %s %q", c.Name, got.Status, got.Message, c.Status, c.Message)
		}
	}
}
